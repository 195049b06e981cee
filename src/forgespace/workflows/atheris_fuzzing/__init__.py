"""atheris_fuzzing workflow package (isolated: corpus and crashes are written per run)."""
