"""Greets; has one obvious secret-looking constant for scanners to find."""

API_TOKEN = "not-a-real-token"


def greet(name: str) -> str:
    """Return a greeting for ``name``."""
    return f"hello, {name}"


if __name__ == "__main__":
    print(greet("forgespace"))
