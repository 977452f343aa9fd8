"""Atomic checkpoints: everything a resume needs, never half-written.

Layout: `<run>/checkpoints/step-000042/` holding
- `*.safetensors`    tensors (adapters, encoder head, ...), one file per group;
- `*.pt`             optimizer / RNG state (torch.save), and `<role>-rank<r>/` folders holding
                     each DeepSpeed rank's own checkpoint files (optimizer, scheduler);
- `state.json`       the `CheckpointRecord`: the same fields for every stage (stage, step, model,
                     layer, injection settings and norm, weight version, learner world size) plus
                     the stage's own resume state (`extra`: data position, RNG);
- `MANIFEST.json`    sha256 of every file, written last. A folder whose manifest does not match
                     is refused, so pickled state is only ever read from files this run wrote
                     (checked before any unpickling).
A checkpoint is built in `.step-000042.tmp/` and renamed into place; `latest` is then replaced
atomically. A crash at any point leaves the previous checkpoint intact.

`load_trained(path)` is the one loader (init_from, --resume, describe, eval, the viewer and the
experiments): it accepts a run folder, a checkpoint folder or a `warmup_then_grpo` folder, and
`served_injection_norm` is the one injection-norm policy. Warmup and GRPO checkpoints hold the
same tensor groups (`decoder_adapter`, `encoder`), so either can start a GRPO run or be described
and evaluated; `--resume` continues only a run of the same stage (`require_stage`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from cycle_oracle.config import validate_recipe
from cycle_oracle.errors import UserError
from cycle_oracle.files import atomic_write, atomic_write_text
from cycle_oracle.models import adapter_module_names


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


PEFT_WEIGHTS = "adapter_model.safetensors"
"""The weights file of a PEFT adapter folder (next to its adapter_config.json)."""


def write_adapter_folder(folder: str | Path, state: dict[str, torch.Tensor], config) -> Path:
    """A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) from a LoRA state
    dict in PEFT's naming (what `get_peft_model_state_dict` / `models.adapter_state` return, and what
    PEFT's own `save_pretrained` writes), without a model: `PeftModel.from_pretrained` and vLLM's
    `LoRARequest` load it as-is. `config` is the adapter's `LoraConfig` (`models.lora_config`, with
    `base_model_name_or_path` set); `all-linear` is written as the adapted module names, as
    `save_pretrained` does. The weights file is replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    if config.target_modules == "all-linear":
        config.target_modules = adapter_module_names(state)
    config.inference_mode = True
    config.save_pretrained(str(folder))
    clean = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(folder / PEFT_WEIGHTS, lambda p: save_file(clean, str(p), metadata={"format": "pt"}))
    return folder


class CheckpointError(UserError, RuntimeError):
    pass


@dataclass
class CheckpointRecord:
    """What every checkpoint says about itself (`state.json`), whichever stage wrote it."""

    stage: str
    """"warmup" or "grpo"."""
    step: int
    model: str
    layer: int
    """The read layer L (block count) the decoder was trained on."""
    injection: dict
    """`InjectionSettings` as JSON (placeholders, placeholder text, mode, scale)."""
    injection_norm: float
    """s in e_p <- s v/||v||: the norm the decoder was trained with (`served_injection_norm`)."""
    weight_version: int
    """The policy version (0 for warmup; GRPO counts syncs)."""
    world_size: int
    """Learner ranks that wrote the DeepSpeed state under `learner/`."""
    extra: dict = field(default_factory=dict)
    """The stage's own resume state (warmup: mixture position and RNG)."""
    dtype: str | None = None
    """The `model.dtype` the run computed in (`auto` resolved at its start); None in checkpoints
    written before it was recorded (their run's config.yaml names it)."""

    INJECTION_KEYS = ("num_placeholders", "placeholder", "mode")
    """The injection settings a decoder is trained for: a run using it must set the same."""

    def check_compatible(self, model: str, layer: int, injection: dict, where: str) -> None:
        """Raise with the differing values unless a run with this model, layer and injection can use it."""
        problems = []
        if self.model != model:
            problems.append(f"model {self.model!r} (this recipe: {model!r}; set model.name)")
        if self.layer != layer:
            problems.append(f"layer {self.layer} (this recipe reads layer {layer}; set model.layer)")
        trained = {k: self.injection.get(k) for k in self.INJECTION_KEYS}
        ours = {k: injection.get(k) for k in self.INJECTION_KEYS}
        if trained != ours:
            problems.append(f"injection {trained} (this recipe: {ours}; set injection.num_placeholders / placeholder / mode)")
        if problems:
            raise CheckpointError(f"{where} was trained with " + "; ".join(problems))


def served_injection_norm(record: CheckpointRecord | None, computed: float) -> tuple[float, str | None]:
    """The one injection-norm policy: a trained decoder is always served with the norm it was trained
    with (the record's); a fresh decoder uses the norm this run computed. -> (norm, note when the
    two differ)."""
    if record is None:
        return float(computed), None
    norm = float(record.injection_norm)
    if abs(norm - computed) > 1e-3 * max(abs(norm), 1.0):
        return norm, f"injection norm {computed:.3f} from this run's corpus differs from the checkpoint's {norm:.3f}: using the checkpoint's"
    return norm, None


def save_checkpoint(
    run_dir: str | Path,
    record: CheckpointRecord,
    tensors: dict[str, dict[str, torch.Tensor]],
    objects: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    keep: int = 2,
    adapter_configs: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `record.step` atomically; keep the newest `keep` checkpoints. Tensor groups
    named in `adapter_configs` (group -> PEFT config) are written as PEFT adapter folders
    (`<group>/adapter_config.json` + `adapter_model.safetensors`), the others as `<group>.safetensors`."""
    step = record.step
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for group, tdict in tensors.items():
        if group in (adapter_configs or {}):  # a PEFT adapter folder: PeftModel.from_pretrained / vLLM LoRARequest load it as-is
            write_adapter_folder(tmp / group, tdict, adapter_configs[group])
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(tmp / f"{group}.safetensors"))
    for group, obj in (objects or {}).items():
        torch.save(obj, tmp / f"{group}.pt")
    for rel, data in (files or {}).items():  # e.g. each DeepSpeed rank's own checkpoint files
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (tmp / "state.json").write_text(json.dumps(asdict(record), indent=2, default=str))
    manifest = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_text(root / "latest", name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which is not in {root}: refusing to start over silently "
                              f"(point it at one of {sorted(p.name for p in root.glob('step-*'))} or remove it)")
    return path


def verify_checkpoint(path: str | Path) -> dict[str, str]:
    path = Path(path)
    manifest_path = path / "MANIFEST.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no MANIFEST.json: not a complete checkpoint written by cycle-oracle")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest.items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is missing or does not match its manifest; refusing to load it")
    return manifest


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """-> (tensor groups, state.json, objects), every tensor on the CPU whatever device wrote it.
    Verifies the manifest first."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    top = [n for n in manifest if "/" not in n]
    tensors = {n[: -len(".safetensors")]: load_file(str(path / n), device="cpu") for n in top if n.endswith(".safetensors")}
    for n in manifest:  # PEFT adapter folders: <group>/adapter_model.safetensors
        parts = n.split("/")
        if len(parts) == 2 and parts[1] == PEFT_WEIGHTS:
            tensors[parts[0]] = load_file(str(path / n), device="cpu")
    # map_location: a checkpoint written on a GPU cluster records its tensors' devices (cuda:N); every load maps them to the CPU
    objects = {n[: -len(".pt")]: torch.load(path / n, weights_only=True, map_location="cpu") for n in top if n.endswith(".pt")}
    state = json.loads((path / "state.json").read_text())
    return tensors, state, objects


@dataclass
class TrainedCheckpoint:
    """A loaded checkpoint: where it is, its record, its tensors and objects, and its run's recipe."""

    path: Path
    run_dir: Path
    record: CheckpointRecord
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, Any]

    def config(self):
        """The recipe the checkpoint's run was started with (`<run>/config.yaml`)."""
        cfg_path = self.run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise CheckpointError(f"cannot find the recipe of checkpoint {self.path}: {cfg_path} is missing")
        cfg = validate_recipe(yaml.safe_load(cfg_path.read_text()) or {}, str(cfg_path), stored=True)
        if cfg.model.dtype == "auto" and self.record.dtype:  # the dtype the run resolved `auto` to
            cfg.model.dtype = self.record.dtype
        return cfg

    def learner_files(self) -> dict[str, bytes]:
        return read_files(self.path, "learner")

    def require_stage(self, stage: str, why: str) -> None:
        if self.record.stage != stage:
            raise CheckpointError(f"{self.path} is a {self.record.stage} checkpoint; {why} needs a {stage} checkpoint")

    def require_tensors(self, *groups: str) -> None:
        missing = [g for g in groups if g not in self.tensors]
        if missing:
            raise CheckpointError(f"checkpoint {self.path} has no {', '.join(missing)} tensors (it holds {sorted(self.tensors)})")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run folder (its `latest` checkpoint), a `warmup_then_grpo` folder (its GRPO run, else its
    warmup) or one checkpoint folder -> (checkpoint folder, run folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist (pass a run folder or <run>/checkpoints/step-N)")
    if (path / "MANIFEST.json").is_file():
        return path, path.parent.parent
    for run_dir in (path, path / "grpo", path / "warmup"):
        if (run_dir / "checkpoints").is_dir():
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                raise CheckpointError(f"run folder {run_dir} has no complete checkpoint yet (checkpoints/latest is missing)")
            return ckpt, run_dir
    raise CheckpointError(f"{path} is neither a run folder (with checkpoints/) nor a checkpoint folder (with MANIFEST.json)")


def load_trained(path: str | Path) -> TrainedCheckpoint:
    """The one checkpoint loader (see the module docstring)."""
    ckpt, run_dir = resolve_checkpoint(path)
    tensors, state, objects = load_checkpoint(ckpt)
    known = {f for f in CheckpointRecord.__dataclass_fields__}
    missing = known - set(state) - {"extra", "dtype"}
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} has no {sorted(missing)} in state.json: it was written before the "
                              f"checkpoint record (cycle-oracle 0.1); rerun the stage that wrote it")
    record = CheckpointRecord(**{k: v for k, v in state.items() if k in known})
    return TrainedCheckpoint(ckpt, run_dir, record, tensors, objects)


def recorded_dtype(path: str | Path) -> str | None:
    """The `model.dtype` a checkpoint's run computed in, read without loading tensors: its record's,
    else its run's config.yaml's unless that says `auto`; None when neither names one."""
    ckpt, run_dir = resolve_checkpoint(path)
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("dtype"):
        return state["dtype"]
    cfg = run_dir / "config.yaml"
    dtype = ((yaml.safe_load(cfg.read_text()) or {}).get("model") or {}).get("dtype", "float32") if cfg.is_file() else None
    return None if dtype == "auto" else dtype


def read_files(path: str | Path, prefix: str) -> dict[str, bytes]:
    """The raw files under `<checkpoint>/<prefix>/` (manifest-verified), keyed by path below it."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    return {n[len(prefix) + 1 :]: (path / n).read_bytes() for n in manifest if n.startswith(prefix + "/")}
