"""python_test_suite workflow package (copy-on-write: the suite writes into its own copy)."""
