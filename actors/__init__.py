"""Thin Ray actors: each owns one library object from `cycle_oracle` and exposes a few methods."""
