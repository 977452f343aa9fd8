"""The code's shape: a Ray-free library, the one batch type, one placement path for every recipe
kind, one checkpoint record and loader, config sections that say whose they are, one metric list."""

import dataclasses
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cycle_oracle
from cycle_oracle.batch import RolloutBatch, gather_in_order, regroup, shard_indices
from cycle_oracle.checkpoint import CheckpointError, load_trained, save_checkpoint
from cycle_oracle.config import ConfigError, RecipeConfig, load_recipe, validate_recipe

REPO = Path(__file__).resolve().parents[1]


def test_the_library_imports_no_ray():
    """Every cycle_oracle module, imported in a fresh interpreter, leaves `ray` unimported."""
    modules = sorted(m.name for m in pkgutil.walk_packages(cycle_oracle.__path__, "cycle_oracle."))
    assert len(modules) > 20, modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"ray was imported by the library: {out.stdout[-500:]}"


# ---------------------------------------------------------------- the one batch type
def _batch(b: int = 3, k: int = 2, d: int = 4, version: int = 1) -> RolloutBatch:
    n = b * k
    return RolloutBatch(
        vectors=torch.arange(b * d, dtype=torch.float32).view(b, d).repeat_interleave(k, 0),
        token_ids=[[i, i + 1] for i in range(n)], sampler_logprobs=[[-0.1 * i] * 2 for i in range(n)],
        texts=[f"text {i}" for i in range(n)], truncated=torch.tensor([i % 3 == 0 for i in range(n)]),
        versions=torch.full((n,), version), group_size=k, temperature=0.7,
    )


def test_rollout_batch_views_select_and_device_move():
    batch = _batch()
    assert len(batch) == 6 and batch.num_activations == 3
    assert batch.groups(torch.arange(6.0)).tolist() == [[0, 1], [2, 3], [4, 5]]
    sub = batch.select([4, 1])
    assert sub.texts == ["text 4", "text 1"] and sub.token_ids == [[4, 5], [1, 2]]
    torch.testing.assert_close(sub.vectors, batch.vectors[[4, 1]])
    assert sub.truncated.tolist() == [False, False] and sub.temperature == 0.7
    with pytest.raises(ValueError, match="whole groups"):
        batch.select([0, 1, 2]).groups(torch.arange(3.0))
    batch.rewards = torch.arange(6.0)
    moved = batch.to("meta")  # every tensor in one call; ids and texts stay Python
    assert all(t.device.type == "meta" for t in (moved.vectors, moved.truncated, moved.versions, moved.rewards))
    assert moved.texts == batch.texts and batch.vectors.device.type == "cpu"
    with pytest.raises(ValueError, match="N=1 entries"):
        RolloutBatch(**{**batch.__dict__, "texts": ["only one"]})


def test_the_driver_attaches_the_activations_to_a_rollout_batch():
    """The engine returns texts, tokens and log-probs; `with_vectors` attaches the B activations
    (repeated over each group's K samples) or N per-sample ones, and refuses any other count."""
    whole = _batch(b=3, k=2, d=4)
    bare = dataclasses.replace(whole, vectors=None)
    per_group = whole.vectors[::2]  # [B, d]
    torch.testing.assert_close(bare.with_vectors(per_group).vectors, whole.vectors)
    torch.testing.assert_close(bare.with_vectors(whole.vectors).vectors, whole.vectors)
    assert bare.vectors is None and len(bare) == 6
    with pytest.raises(ValueError, match="4 activations for 6 samples"):
        bare.with_vectors(torch.zeros(4, 4))


def test_regroup_puts_rollout_parts_back_in_activation_order():
    """Two rollout actors take activations (0, 2) and (1,): the driver gets one batch in order 0, 1, 2."""
    whole = _batch(b=3, k=2)
    part0 = whole.select([0, 1, 4, 5])  # activations 0 and 2
    part1 = whole.select([2, 3])  # activation 1
    back = regroup([part0, part1], [[0, 2], [1]])
    assert back.texts == whole.texts
    torch.testing.assert_close(back.vectors, whole.vectors)
    with pytest.raises(ValueError, match="cover activations"):
        regroup([part0], [[0, 2]])


def test_sharding_and_gathering_keep_sample_order():
    n, world = 7, 3
    parts = shard_indices(n, world)
    assert sorted(i for p in parts for i in p) == list(range(n)) and parts[0] == [0, 3, 6]
    values = torch.arange(n, dtype=torch.float32) * 10
    per_rank = [values[p].tolist() for p in parts]
    torch.testing.assert_close(gather_in_order(per_rank, parts, n), values)


# ---------------------------------------------------------------- placement
@pytest.mark.parametrize("kind, roles", [("describe", ["learner", "rollout"]), ("eval", ["learner"]),
                                         ("warmup", ["learner", "learner", "rollout", "encoder"]),
                                         ("grpo", ["learner", "learner", "rollout", "rollout", "encoder"])])
def test_every_recipe_kind_has_the_plan_it_places(kind, roles):
    from actors.placement import placement_plan

    cfg = RecipeConfig(kind=kind, resources={"learner": {"num_actors": 2}, "rollout": {"num_actors": 2, "num_gpus": 1}})
    plan = placement_plan(cfg)
    assert [item["role"] for item in plan] == roles
    assert all(item["bundle"].get("GPU") == 1 for item in plan if item["role"] == "rollout")


# ---------------------------------------------------------------- config sections
def test_old_recipe_keys_fail_naming_the_new_key(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("kind: grpo\noptim: {lr: 1.0e-3}\nencoder: {lr: 3.0e-4}\nencoder_role: {num_cpus: 1}\n"
                   "warmup: {heldout_fraction: 0.3}\nrollout: {threads: 2}\ngrpo: {optim: {lr: 1.0e-4}}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(old)
    for old_key, new_key in (("optim", "decoder_optim"), ("encoder.lr", "encoder.optim.lr"), ("encoder_role", "resources.encoder"),
                             ("warmup.heldout_fraction", "split.heldout_fraction"), ("rollout.threads", "resources.rollout.threads"),
                             ("grpo.optim", "grpo.decoder_optim")):
        assert f"'{old_key}' has moved: write it as '{new_key}'" in str(err.value)
    with pytest.raises(ConfigError, match="key 'logging.log_every' is gone .*: delete it"):
        validate_recipe({"kind": "grpo", "logging": {"log_every": 5}})


def test_a_run_written_before_a_key_was_removed_still_loads(tmp_path):
    """A run's own config.yaml is not a user's recipe: one an older version wrote with a key that is
    gone since (it changed nothing) still loads as its checkpoint's recipe; the other keys are kept."""
    import yaml

    from cycle_oracle.config import dump_recipe
    from recipes.common import record

    writer = _run(tmp_path / "g", seed=7)
    raw = yaml.safe_load(dump_recipe(writer.cfg))
    raw["logging"]["log_every"] = 5  # what runs before the removal wrote
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "config.yaml").write_text(yaml.safe_dump(raw))
    save_checkpoint(tmp_path / "g", record(writer, "grpo", 2, 3.5, 3, 1), {"decoder_adapter": {"w": torch.ones(2)}})
    cfg = load_trained(tmp_path / "g").config()
    assert cfg.seed == 7 and cfg.model == writer.cfg.model


def test_a_nucleus_the_learner_cannot_score_is_refused():
    """The learner's log-probs are of the whole distribution: top-p < 1 would bias the importance
    ratio silently, so the schema refuses it (1.0, the default, passes)."""
    assert validate_recipe({"kind": "grpo", "sampling": {"top_p": 1.0}}).sampling.top_p == 1.0
    with pytest.raises(ConfigError, match="sampling.top_p=0.9: the learner's log-probs are of the whole distribution"):
        validate_recipe({"kind": "warmup", "sampling": {"top_p": 0.9}})


def test_every_config_field_is_described():
    """Walk the recipe schema from the top through every section (and list / optional sections):
    each field has a description (its attribute docstring, `use_attribute_docstrings`), which
    `cycle-oracle config SECTION` prints."""
    from cycle_oracle.config import field_help, schema_section, section_model

    undescribed, seen, paths = [], set(), [""]
    while paths:
        path = paths.pop()
        model = schema_section(path)
        if model in seen:
            continue
        seen.add(model)
        for row in field_help(path):
            if not row.description:
                undescribed.append(f"{path + '.' if path else ''}{row.name}")
            if row.section:
                paths.append(f"{path + '.' if path else ''}{row.name}")
    assert len(seen) >= 20 and section_model(RecipeConfig.model_fields["grpo"].annotation) in seen
    assert not undescribed, f"config fields without a description: {undescribed}"


def test_every_shipped_recipe_validates():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_grpo_decoder_optimiser_leaves_the_encoder_clip_alone(tiny_path):
    """`grpo.decoder_optim` is the decoder's; the encoder clips by `encoder.optim.grad_clip` (the old
    driver swapped `optim` for `grpo.optim`, and with it the encoder's clip)."""
    from cycle_oracle.encoder_trainer import EncoderTrainer

    base = {"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "encoder": {"lora": {"r": 2, "alpha": 4}, "optim": {"lr": 1e-2}}}

    def update(cfg_dict) -> torch.Tensor:
        torch.manual_seed(0)
        trainer = EncoderTrainer(str(tiny_path), validate_recipe(cfg_dict), 1, torch.zeros(128))
        before = {k: v.clone() for k, v in trainer.state()[0].items()}
        trainer.train_step(["a cat sat", "the river flows"], torch.randn(2, 128, generator=torch.Generator().manual_seed(1)) * 5)
        return torch.cat([(v - before[k]).flatten() for k, v in trainer.state()[0].items()])

    plain = update(base)
    with_grpo_optim = update({**base, "grpo": {"decoder_optim": {"lr": 1e-5, "grad_clip": 1e-8}}})
    tiny_clip = update({**base, "encoder": {**base["encoder"], "optim": {"lr": 1e-2, "grad_clip": 1e-8}}})
    torch.testing.assert_close(with_grpo_optim, plain)
    assert not torch.allclose(tiny_clip, plain), "encoder.optim.grad_clip must be the clip the encoder uses"


# ---------------------------------------------------------------- the one checkpoint record
def _run(tmp_path, **recipe):
    cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, **recipe})
    return SimpleNamespace(cfg=cfg, layer=1, out=tmp_path)


def test_a_grpo_checkpoint_carries_the_record_and_init_from_checks_its_injection(tmp_path):
    """GRPO checkpoints used to lack the injection record, so init_from from one skipped the check."""
    from recipes.common import load_start, record

    from cycle_oracle.files import atomic_write_text
    from cycle_oracle.config import dump_recipe

    writer = _run(tmp_path / "g", injection={"num_placeholders": 1})
    atomic_write_text(tmp_path / "g" / "config.yaml", dump_recipe(writer.cfg))
    save_checkpoint(tmp_path / "g", record(writer, "grpo", 5, 3.5, 6, 1), {"decoder_adapter": {"w": torch.ones(2)}})
    loaded = load_trained(tmp_path / "g")
    rec = json.loads((loaded.path / "state.json").read_text())
    assert rec["stage"] == "grpo" and rec["injection"]["num_placeholders"] == 1 and rec["injection_norm"] == 3.5
    assert rec["weight_version"] == 6 and rec["world_size"] == 1 and rec["layer"] == 1
    assert load_start(_run(tmp_path, injection={"num_placeholders": 1}, init_from=str(tmp_path / "g"))).record.step == 5
    with pytest.raises(CheckpointError, match="num_placeholders"):
        load_start(_run(tmp_path, injection={"num_placeholders": 4}, init_from=str(tmp_path / "g")))
    with pytest.raises(CheckpointError, match="a grpo checkpoint; resuming a warmup run needs a warmup checkpoint"):
        loaded.require_stage("warmup", "resuming a warmup run")


def test_the_loader_takes_run_pipeline_and_checkpoint_folders_and_names_what_is_missing(tmp_path):
    from recipes.common import record

    run = _run(tmp_path)
    save_checkpoint(tmp_path / "pipe" / "warmup", record(run, "warmup", 3, 2.0, 0, 1), {"decoder_adapter": {"w": torch.ones(1)}})
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "warmup", tmp_path / "pipe" / "warmup" / "checkpoints" / "step-000003"):
        assert load_trained(path).record.stage == "warmup"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_trained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a run folder"):
        load_trained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no encoder tensors"):
        load_trained(tmp_path / "pipe").require_tensors("encoder")


def test_one_injection_norm_policy():
    from cycle_oracle.checkpoint import CheckpointRecord, served_injection_norm

    rec = CheckpointRecord("warmup", 1, "m", 1, {}, injection_norm=4.0, weight_version=0, world_size=1)
    assert served_injection_norm(None, 2.5) == (2.5, None)
    norm, note = served_injection_norm(rec, 2.5)
    assert norm == 4.0 and "using the checkpoint's" in note
    assert served_injection_norm(rec, 4.0) == (4.0, None)


# ---------------------------------------------------------------- the one metric list
def test_the_logger_refuses_metric_names_it_does_not_list(tmp_path):
    from cycle_oracle.config import LoggingSettings
    from cycle_oracle.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, LoggingSettings(wandb_mode="disabled"), {})
    logger.log("grpo", 1, {"reward_mean": 0.5, "time_step": 1.0})
    logger.log("warmup", 1, {"loss": 1.0, "loss/latentqa": 0.9})
    with pytest.raises(ValueError, match="reward_meen"):
        logger.log("grpo", 2, {"reward_meen": 0.5})
    with pytest.raises(ValueError, match="unknown metrics stage"):
        logger.log("gpro", 2, {"reward_mean": 0.5})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["grpo", "warmup"]


# ---------------------------------------------------------------- devices
def _record_input_devices(module, seen: list) -> None:
    """A device-recording hook: every tensor passed into `module` (positionally or by keyword)."""
    def hook(_mod, args, kwargs):
        seen.extend(t.device.type for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
    module.register_forward_pre_hook(hook, with_kwargs=True)


def test_inputs_follow_the_model_device(tiny_path, tiny_tokenizer, monkeypatch):
    """Every tensor a role builds goes to its model's device: with the model on `meta` (the CPU
    machine's stand-in for a GPU), the tensors reaching the transformer (decoder log-probs,
    residual reads, the encoder) must be on `meta` too, not where they were built (the CPU)."""
    import torch.fx.experimental._config as fx_config

    from cycle_oracle.activations import read_residual
    from cycle_oracle.decoder import build_batch, completion_logits
    from cycle_oracle.encoder_trainer import EncoderTrainer
    from cycle_oracle.injection import build_decoder_prompt
    from cycle_oracle.models import load_causal_lm

    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # boolean masks on meta: shapes are fake, devices real
    model = load_causal_lm(tiny_path)
    model.set_attn_implementation("eager")  # sdpa's mask check reads a value, which meta tensors do not have
    model = model.to("meta")
    seen: list[str] = []
    _record_input_devices(model.model, seen)
    prompt = build_decoder_prompt(tiny_tokenizer, 1, "What is this?", 1, " ?")
    batch = build_batch([prompt, prompt], [[5, 6, 7], [8, 9]], tiny_tokenizer.pad_token_id)  # on the CPU
    assert completion_logits(model, batch, torch.randn(2, 128), 2.0).device.type == "meta"
    ids = torch.tensor([[1, 5, 6, 7]])
    assert read_residual(model, ids, torch.ones_like(ids), 1).device.type == "meta"
    assert seen and set(seen) == {"meta"}, f"inputs reached the decoder on {sorted(set(seen))}"

    cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "encoder": {"lora": {"r": 2, "alpha": 4}}})
    trainer = EncoderTrainer(str(tiny_path), cfg, 1, torch.zeros(128))
    trainer.encoder.trunk.set_attn_implementation("eager")
    trainer.encoder.to("meta")
    seen.clear()
    _record_input_devices(trainer.encoder.trunk, seen)
    v_hat, _ = trainer.reconstruct(["a cat sat on the mat"])
    assert v_hat.device.type == "meta" and v_hat.shape == (1, 128)
    assert seen and set(seen) == {"meta"}, f"inputs reached the encoder on {sorted(set(seen))}"
