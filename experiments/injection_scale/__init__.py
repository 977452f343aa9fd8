"""Which injection scale should be the default (README.md)."""
