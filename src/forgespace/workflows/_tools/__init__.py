"""Tool code shared by the bundled workflows (plain functions, no Temporal)."""
