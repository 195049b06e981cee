"""security_assessment workflow package (shared: a read-only scan of one download)."""
