"""Ray set-up shared by every recipe kind: starting/joining a cluster, the one placement path
(a placement group holding every role the recipe kind uses, reserved before any actor starts;
a plan the cluster could never hold fails at once with a `PlacementError` naming the role, the
resource, what is asked and what the cluster has), and the one way to wait on remote work
(always with a timeout, so a pending actor fails loudly).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cycle_oracle.errors import UserError
from cycle_oracle.rollout import rollout_runtime_env

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
        if not verbose:  # a local cluster turns token authentication on and warns that it did: a notice, not a problem
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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
    """Bundles per role of the recipe's kind (what `--dry-run` prints and the placement group reserves):
    each actor's CPUs, GPUs and custom Ray resources (`resources.<role>.resources`)."""
    plan = []
    for role in ROLES_BY_KIND[cfg.kind]:
        res = getattr(cfg.resources, role)
        count = 1 if role == "encoder" or (cfg.kind, role) in SINGLE_ACTOR else res.num_actors
        for i in range(count):
            bundle = {"CPU": res.num_cpus}
            if res.num_gpus:
                bundle["GPU"] = res.num_gpus
            bundle.update(res.resources)
            plan.append({"role": role, "index": i, "bundle": bundle, "threads": res.threads})
    return plan


def _actors(n: int) -> str:
    return f"{n} actor{'s' if n != 1 else ''}"


def plan_shortfalls(plan: list[dict], have: dict[str, float], who: str = "the cluster has") -> list[str]:
    """One line per resource the plan asks more of than `have` holds (empty list = fits), naming
    each role that asks for it, e.g. "resources.learner asks for 4 actors x 1 GPU = 4 GPU, the
    cluster has 0 GPU"."""
    by_role: dict[str, dict[str, list[float]]] = {}  # resource -> role -> per-actor amounts
    for item in plan:
        for k, v in item["bundle"].items():
            by_role.setdefault(k, {}).setdefault(item["role"], []).append(v)
    lines = []
    for k, roles in by_role.items():
        total = sum(sum(v) for v in roles.values())
        if total <= have.get(k, 0.0) + 1e-9:
            continue
        asks = [f"resources.{role} asks for {_actors(len(v))} x {v[0]:g} {k} = {sum(v):g} {k}" for role, v in roles.items()]
        both = f" ({total:g} {k} in all)" if len(asks) > 1 else ""
        lines.append(f"{', '.join(asks)}{both}, {who} {have.get(k, 0.0):g} {k}")
    return lines


def bundle_shortfalls(plan: list[dict], nodes: list[dict[str, float]]) -> list[str]:
    """One line per role whose one actor's bundle fits on no single node (a bundle is never split
    across nodes), e.g. 8 GPUs per actor on nodes of 4."""
    lines, seen = [], set()
    for item in plan:
        role, bundle = item["role"], item["bundle"]
        if role in seen:
            continue
        seen.add(role)
        if not any(all(v <= node.get(k, 0.0) + 1e-9 for k, v in bundle.items()) for node in nodes):
            largest = {k: max((node.get(k, 0.0) for node in nodes), default=0.0) for k in bundle}
            lines.append(f"resources.{role} asks for {_fmt(bundle)} per actor, but no node has that much "
                         f"(most on one node: {_fmt(largest)})")
    return lines


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"


def check_plan_fits(plan: list[dict], shape: dict[str, float]) -> list[str]:
    """Problems (empty list = fits) of a placement plan against a declared cluster shape (`--dry-run`)."""
    return plan_shortfalls(plan, shape, "the declared cluster has")


class PlacementError(UserError, RuntimeError):
    """The cluster cannot hold the recipe's roles as its `resources` section asks."""


class PlacementTimeout(PlacementError, RemoteTimeout):
    """The placement group did not become ready in time (the cluster has the resources, but they are taken)."""


def check_cluster_fits(plan: list[dict]) -> None:
    """Fail at once, naming role, resource, what is asked and what the cluster has, when the running
    Ray cluster could never hold the plan (Ray would otherwise leave the group pending until the
    timeout). Compares with the cluster's totals, not what is free now: taken resources may free up."""
    alive = [n for n in ray.nodes() if n.get("Alive", n.get("alive", False))]
    problems = plan_shortfalls(plan, ray.cluster_resources()) or bundle_shortfalls(plan, [n.get("Resources", {}) for n in alive])
    if problems:
        raise PlacementError(
            "the Ray cluster cannot hold this recipe's roles: " + "; ".join(problems)
            + f" (cluster resources: {_fmt(_plain(ray.cluster_resources()))}). Lower resources.<role>.num_actors / num_cpus / "
            "num_gpus / resources, or join a cluster that has them (--address; custom resources come from `ray start --resources`)"
        )


def _plain(resources: dict[str, float]) -> dict[str, float]:
    """Ray's resources without its bookkeeping entries (node:<ip>, memory, placement-group shares)."""
    return {k: v for k, v in resources.items() if not k.startswith("node:") and "_group_" not in k
            and k not in ("memory", "object_store_memory")}


class Placement:
    """The placement group of one recipe run: every actor and task of the run is scheduled into
    its bundle through `options(role, index)`."""

    def __init__(self, cfg, timeout_s: float):
        self.plan = placement_plan(cfg)
        self.rollout_settings = cfg.rollout
        check_cluster_fits(self.plan)  # an impossible plan fails now, not after the timeout
        self.group = placement_group([item["bundle"] for item in self.plan], strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout_s)
        pending = [] if ready else self.pending_bundles()  # (none pending: it became ready just now)
        if pending:
            self.remove()
            raise PlacementTimeout(
                f"the placement group was not ready within {timeout_s:.0f}s; pending bundles: "
                + "; ".join(f"{i['role']}[{i['index']}] {{{_fmt(i['bundle'])}}}" for i in pending)
                + f". The cluster has them in total but not free now (free: {_fmt(_plain(ray.available_resources()))}):"
                " other jobs or actors hold them (`ray status`)"
            )

    def pending_bundles(self) -> list[dict]:
        """Plan items whose bundle is not placed on a node yet (Ray places a PACK group all at once,
        so while it is pending this is usually every bundle)."""
        table = ray.util.placement_group_table(self.group)
        placed = {int(b) for b, node in (table.get("bundles_to_node_id") or {}).items() if node}
        if table.get("state") == "CREATED":
            return []
        return [item for b, item in enumerate(self.plan) if b not in placed]

    def options(self, role: str, index: int = 0, **extra) -> dict:
        """Ray `.options(...)` for actor/task `index` of `role`: its bundle's CPUs/GPUs, inside the group.
        A rollout actor's runtime_env also gets the LD_PRELOAD of `rollout.preload: auto`."""
        if role == "rollout":
            runtime_env = rollout_runtime_env(self.rollout_settings, base=extra.pop("runtime_env", None))
            if runtime_env:
                extra["runtime_env"] = runtime_env

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
