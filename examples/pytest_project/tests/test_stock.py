import pytest
from inventory import Stock


def test_add_and_count() -> None:
    s = Stock()
    s.add("bolt", 3)
    s.add("bolt")
    assert s.count("bolt") == 4


def test_remove() -> None:
    s = Stock()
    s.add("nut", 5)
    s.remove("nut", 2)
    assert s.count("nut") == 3


def test_remove_more_than_stocked_fails() -> None:
    s = Stock()
    with pytest.raises(ValueError, match="only 0"):
        s.remove("washer")


def test_add_rejects_non_positive() -> None:
    with pytest.raises(ValueError):
        Stock().add("bolt", 0)


def test_low_stock_includes_threshold() -> None:
    s = Stock()
    s.add("bolt", 2)
    s.add("nut", 10)
    assert s.low_stock(2) == ["bolt"]  # fails: the planted off-by-one
