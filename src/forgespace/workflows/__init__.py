"""Bundled workflow packages: one folder each with metadata.yaml, workflow.py, activities.py."""
