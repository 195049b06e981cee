"""cargo_fuzzing workflow package (isolated: the build, corpus and crashes are written per run)."""
