"""secret_detection workflow package (shared: a read-only scan of one download)."""
