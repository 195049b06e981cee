"""A tiny package used as a demo target."""
