"""The `cycle-oracle` command (outside the library: it may import Ray, the actors, the recipe
drivers and the benchmark; `cycle_oracle/` imports none of them)."""
