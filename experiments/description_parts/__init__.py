"""Which part of a quoted description carries the activation (README.md)."""
