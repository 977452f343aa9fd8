"""Atomic checkpoints: everything a resume needs, never half-written.

Layout: `<run>/checkpoints/step-000042/` holding
- `*.safetensors`    tensors (adapters, encoder head, ...), one file per group;
- `*.pt`             optimizer / RNG state (torch.save), and `<role>-rank<r>/` folders holding
                     each DeepSpeed rank's own checkpoint files (optimizer, scheduler);
- `state.json`       step, data position, weight version, config, anything JSON;
- `MANIFEST.json`    sha256 of every file, written last. A folder whose manifest does not match
                     is refused, so pickled state is only ever read from files this run wrote
                     (checked before any unpickling).
A checkpoint is built in `.step-000042.tmp/` and renamed into place; `latest` is then replaced
atomically. A crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp over `path` (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    objects: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for group, tdict in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(tmp / f"{group}.safetensors"))
    for group, obj in (objects or {}).items():
        torch.save(obj, tmp / f"{group}.pt")
    for rel, data in (files or {}).items():  # e.g. each DeepSpeed rank's own checkpoint files
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
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
    """-> (tensor groups, state.json, objects). Verifies the manifest first."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    top = [n for n in manifest if "/" not in n]
    tensors = {n[: -len(".safetensors")]: load_file(str(path / n)) for n in top if n.endswith(".safetensors")}
    objects = {n[: -len(".pt")]: torch.load(path / n, weights_only=True) for n in top if n.endswith(".pt")}
    state = json.loads((path / "state.json").read_text())
    return tensors, state, objects


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), np_state[2], np_state[3], np_state[4]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))


def read_files(path: str | Path, prefix: str) -> dict[str, bytes]:
    """The raw files under `<checkpoint>/<prefix>/` (manifest-verified), keyed by path below it."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    return {n[len(prefix) + 1 :]: (path / n).read_bytes() for n in manifest if n.startswith(prefix + "/")}
