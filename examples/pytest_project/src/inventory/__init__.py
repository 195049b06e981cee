"""A tiny stock-keeping library for the python_test_suite workflow demo."""

from inventory.stock import Stock

__all__ = ["Stock"]
