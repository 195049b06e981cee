"""Stock levels per item, with a planted off-by-one the test suite catches."""

from __future__ import annotations


class Stock:
    """Counts of items on hand."""

    def __init__(self) -> None:
        self._items: dict[str, int] = {}

    def add(self, item: str, count: int = 1) -> None:
        if count <= 0:
            raise ValueError("count must be positive")
        self._items[item] = self._items.get(item, 0) + count

    def remove(self, item: str, count: int = 1) -> None:
        have = self._items.get(item, 0)
        if count > have:
            raise ValueError(f"only {have} of {item!r} in stock")
        self._items[item] = have - count

    def count(self, item: str) -> int:
        return self._items.get(item, 0)

    def low_stock(self, threshold: int) -> list[str]:
        # Planted bug: items exactly at the threshold should be reported too (<=).
        return sorted(name for name, n in self._items.items() if n < threshold)

    def export_csv(self) -> str:
        # Never called by the tests: shows up as uncovered lines.
        lines = ["item,count"]
        for name in sorted(self._items):
            lines.append(f"{name},{self._items[name]}")
        return "\n".join(lines) + "\n"
