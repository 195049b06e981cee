"""A deliberately insecure demo app: every finding here is planted for the scanners."""
