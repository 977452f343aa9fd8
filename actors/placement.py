"""Ray set-up shared by every recipe: starting/joining a cluster, placement groups from the recipe,
and the one way to wait on remote work (always with a timeout, so a pending actor fails loudly)."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray


class RemoteTimeout(TimeoutError):
    pass


def init_ray(cfg) -> None:
    """`ray.address` None: a local Ray (`ray.init()`); "auto" or an address: join that cluster."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), **kwargs)


def remote_get(refs, timeout_s: float, what: str):
    """ray.get with a timeout that names what was awaited."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        raise RemoteTimeout(
            f"{what} did not finish within {timeout_s:.0f}s (pending actor or too few resources? "
            f"cluster has {ray.available_resources()})"
        ) from err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def role_options(resources, **extra) -> dict:
    """Ray actor options for one actor of a role (fractional CPUs allowed on small machines)."""
    opts = dict(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
    opts.update(extra)
    return opts


def placement_plan(cfg) -> list[dict]:
    """Bundles per role as the recipe asks (what `--dry-run` prints and placement groups reserve)."""
    plan = []
    for role, res in (("rollout", cfg.rollout), ("learner", cfg.learner), ("encoder", cfg.encoder_role)):
        for i in range(res.num_actors):
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


def create_placement_group(plan: list[dict], timeout_s: float):
    from ray.util.placement_group import placement_group

    pg = placement_group([item["bundle"] for item in plan], strategy="PACK")
    remote_get(pg.ready(), timeout_s, f"placement group {[i['bundle'] for i in plan]}")
    return pg


def bundle_options(pg, plan: list[dict], role: str, index: int) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    for b, item in enumerate(plan):
        if item["role"] == role and item["index"] == index:
            opts = {"num_cpus": item["bundle"]["CPU"], "num_gpus": item["bundle"].get("GPU", 0)}
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=b)
            return opts
    raise KeyError(f"no bundle for {role}[{index}] in the plan")
