"""Ray actors, one per role: a library class under `@ray.remote` (learner, encoder) or a thin owner of one (rollout), called by its real method names; `placement.py` places every recipe kind."""
