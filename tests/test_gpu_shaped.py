"""The GPU-shaped recipe (recipes/smoke_gpu_shaped.yaml) end to end on the CPU, on a 3-node local
Ray cluster: bf16 through vLLM, DeepSpeed and the encoder (its sync checks pass at the bf16
tolerance), adapter weight sync, overlapped rollouts, a `datasets` corpus from local files,
gradient checkpointing and micro-batching, and 2 learners on the 2 worker nodes, so learner rank 0
and its rendezvous sit on a node that is not the driver's. Each node (and the driver) has its own
model cache, as separate machines would: every role resolves the recipe's model on its own node."""

import json
from pathlib import Path

import pytest
import ray

from cycle_oracle.config import load_recipe
from cycle_oracle.models import resolve_model_path
from cycle_oracle.weight_sync import SYNC_NOISE_MULTIPLE, SYNC_TOLERANCE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _model_cache(root: Path) -> Path:
    """An empty model cache (CYCLE_ORACLE_CACHE) that shares only the converted SmolLM2 (whose
    tokenizer the tiny random Llama is built with) with this machine's cache."""
    (root / "models").mkdir(parents=True)
    (root / "models" / "smollm2-135m-instruct").symlink_to(resolve_model_path("smollm2-135m-instruct"))
    return root


def test_the_gpu_shaped_recipe_runs_with_learner_rank0_off_the_drivers_node(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from recipes import grpo

    monkeypatch.chdir(REPO)  # the recipe names its corpus file relative to the repository
    caches = {name: _model_cache(tmp_path / f"cache-{name}") for name in ("driver", "head", "worker0", "worker1")}
    monkeypatch.setenv("CYCLE_ORACLE_CACHE", str(caches["driver"]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "env_vars": {"CYCLE_ORACLE_CACHE": str(caches["head"])}})
    workers = [cluster.add_node(num_cpus=1, resources={"learner_slot": 1}, env_vars={"CYCLE_ORACLE_CACHE": str(caches[f"worker{i}"])})
               for i in range(2)]
    cluster.wait_for_nodes()
    out = tmp_path / "run"
    try:
        # a sync check at the first sync and every 2nd after it: the setup sync and the one after step 2
        cfg = load_recipe(REPO / "recipes" / "smoke_gpu_shaped.yaml", [f"ray.address={cluster.address}", "grpo.sync_check_every=2"])
        assert cfg.model.dtype == "bfloat16" and cfg.rollout.weight_sync == "adapter" and cfg.grpo.overlap_rollout
        assert cfg.memory.gradient_checkpointing and cfg.memory.micro_batch_tokens and cfg.corpus.kind == "datasets"
        results = grpo.run(cfg, out)
        driver_node = ray.get_runtime_context().get_node_id()
        head_node = cluster.head_node.node_id  # cluster.shutdown() forgets it
        learners = list_actors(filters=[("class_name", "=", "LearnerActor")], detail=True)
        role_nodes = {a.node_id for a in list_actors(detail=True) if a.class_name in ("LearnerActor", "RolloutActor", "EncoderActor")}
        rendezvous = list_tasks(filters=[("func_or_class_name", "=", "_node_address_and_port")], detail=True)
    finally:
        ray.shutdown()
        cluster.shutdown()

    learner_nodes = {a.node_id for a in learners}
    worker_nodes = {w.node_id for w in workers}
    assert len(learners) == 2 and learner_nodes == worker_nodes, "one learner on each worker node"
    assert driver_node not in learner_nodes
    assert rendezvous and {t.node_id for t in rendezvous} <= learner_nodes, "rank 0's address and port come from its own node"

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    grpo_rows = {r["step"]: r for r in rows if r["stage"] == "grpo"}
    assert sorted(grpo_rows) == list(range(1, cfg.grpo.steps + 1))
    checked = [r for r in rows if "sync_logprob_error_p99" in r]
    assert [(r["stage"], r["step"]) for r in checked] == [("grpo_setup", 0), ("grpo", 2)], "grpo.sync_check_every=2"
    assert all(grpo_rows[s]["time_sync_check"] == 0.0 for s in (1, 3)) and grpo_rows[2]["time_sync_check"] > 0
    for r in checked:  # the first check measures the kernel-noise floor (judged by the ceilings), the later one is judged by it
        assert r["sync_logprob_error_p99"] <= r["sync_bound_p99"] <= SYNC_TOLERANCE["bfloat16"]["p99"]
        assert r["sync_logprob_error_mean"] <= r["sync_bound_mean"] <= SYNC_TOLERANCE["bfloat16"]["mean"]
    first, later = checked
    assert first["sync_noise_floor_mean"] == first["sync_logprob_error_mean"] and first["sync_bound_mean"] == SYNC_TOLERANCE["bfloat16"]["mean"]
    assert later["sync_noise_floor_mean"] == first["sync_noise_floor_mean"]
    assert later["sync_bound_mean"] == min(SYNC_TOLERANCE["bfloat16"]["mean"], SYNC_NOISE_MULTIPLE * first["sync_noise_floor_mean"])
    node_cache = {head_node: "head", **{w.node_id: f"worker{i}" for i, w in enumerate(workers)}}
    assert role_nodes <= set(node_cache) and len(role_nodes) >= 2
    for name in ["driver", *(node_cache[n] for n in role_nodes)]:  # every role resolved the recipe's model where it ran
        assert (caches[name] / "models" / "tiny-random-llama" / "config.json").is_file(), f"nothing resolved the model on the {name}'s node"
    for step in range(2, cfg.grpo.steps + 1):  # overlapped: step s trains on samples of the version before the last sync
        assert grpo_rows[step]["rollout_versions"] == grpo_rows[step - 1]["weight_version"] - 1
    assert results["retrieval"]["n"] >= 2
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    size = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
    assert size < 5_000_000, f"a checkpoint holds what was trained, not the frozen base: {size} bytes"
