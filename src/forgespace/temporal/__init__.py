"""Temporal integration: activities, worker, workflow discovery, embedded dev server, runner."""
