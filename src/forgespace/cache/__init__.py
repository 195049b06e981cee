"""The workspace cache engine: modes, locks, leases, index, safe extraction, cloning, eviction."""
