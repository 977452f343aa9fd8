"""Ray set-up shared by every recipe kind: starting/joining a cluster, the one placement path
(a placement group holding every role the recipe kind uses, reserved before any actor starts),
and the one way to wait on remote work (always with a timeout, so a pending actor fails loudly).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import ray

ROLES_BY_KIND = {
    "describe": ("learner", "rollout"),
    "warmup": ("learner", "rollout", "encoder"),
    "grpo": ("learner", "rollout", "encoder"),
    "warmup_then_grpo": ("learner", "rollout", "encoder"),
    "eval": ("learner",),
}
"""Which roles each recipe kind places, in bundle order. The first bundle (the learner's, where the
kind has one) also runs the one-off tasks (warmup data, activation extraction) before the actors
start; `describe` and `eval` use one learner bundle for that alone (`eval` runs its oracle in the
driver)."""

SINGLE_ACTOR = {("describe", "learner"), ("eval", "learner"), ("describe", "rollout"), ("warmup", "rollout")}
"""Roles a kind runs one actor of whatever `num_actors` says (the encoder is always one actor)."""


class RemoteTimeout(TimeoutError):
    pass


def init_ray(cfg) -> None:
    """`ray.address` None: a local Ray (`ray.init()`); "auto" or an address: join that cluster."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    verbose = cfg.logging.verbose  # quiet: actors write to <run>/logs/ (actors/logs.py), Ray's own INFO lines stay off
    kwargs: dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=verbose,
                                  logging_level=logging.INFO if verbose else logging.WARNING)
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), **kwargs)


def remote_get(refs, timeout_s: float, what: str):
    """ray.get with a timeout that names what was awaited. For a list, the first result that is an
    error is raised at once (a dead learner rank must not leave the driver waiting on its peers,
    which block in a collective)."""
    deadline = time.time() + timeout_s
    try:
        if isinstance(refs, list):
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.time()))
                if not ready:
                    raise ray.exceptions.GetTimeoutError(what)
                ray.get(ready[0])  # raises the remote error, if any
        return ray.get(refs, timeout=max(0.0, deadline - time.time()))
    except ray.exceptions.GetTimeoutError as err:
        raise RemoteTimeout(
            f"{what} did not finish within {timeout_s:.0f}s (pending actor or too few resources? "
            f"cluster has {ray.available_resources()})"
        ) from err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def placement_plan(cfg) -> list[dict]:
    """Bundles per role of the recipe's kind (what `--dry-run` prints and the placement group reserves)."""
    plan = []
    for role in ROLES_BY_KIND[cfg.kind]:
        res = getattr(cfg.resources, role)
        count = 1 if role == "encoder" or (cfg.kind, role) in SINGLE_ACTOR else res.num_actors
        for i in range(count):
            bundle = {"CPU": res.num_cpus}
            if res.num_gpus:
                bundle["GPU"] = res.num_gpus
            plan.append({"role": role, "index": i, "bundle": bundle, "threads": res.threads})
    return plan


def check_plan_fits(plan: list[dict], shape: dict[str, float]) -> list[str]:
    """Problems (empty list = fits) of a placement plan against a declared cluster shape."""
    need: dict[str, float] = {}
    for item in plan:
        for k, v in item["bundle"].items():
            need[k] = need.get(k, 0.0) + v
    return [f"needs {v:g} {k} but the cluster declares {shape.get(k, 0):g}" for k, v in need.items() if v > shape.get(k, 0) + 1e-9]


class Placement:
    """The placement group of one recipe run: every actor and task of the run is scheduled into
    its bundle through `options(role, index)`."""

    def __init__(self, cfg, timeout_s: float):
        from ray.util.placement_group import placement_group

        self.plan = placement_plan(cfg)
        self.group = placement_group([item["bundle"] for item in self.plan], strategy="PACK")
        remote_get(self.group.ready(), timeout_s, f"placement group {[i['bundle'] for i in self.plan]}")

    def options(self, role: str, index: int = 0, **extra) -> dict:
        """Ray `.options(...)` for actor/task `index` of `role`: its bundle's CPUs/GPUs, inside the group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        for b, item in enumerate(self.plan):
            if item["role"] == role and item["index"] == index:
                strategy = PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=b)
                return {"num_cpus": item["bundle"]["CPU"], "num_gpus": item["bundle"].get("GPU", 0),
                        "scheduling_strategy": strategy, **extra}
        raise KeyError(f"no bundle for {role}[{index}] in the plan ({[(i['role'], i['index']) for i in self.plan]})")

    def task_options(self) -> tuple[dict, int]:
        """(Ray options, torch threads) for a one-off task: the first bundle of the plan."""
        first = self.plan[0]
        return self.options(first["role"], first["index"]), first["threads"]

    def remove(self) -> None:
        ray.util.remove_placement_group(self.group)
