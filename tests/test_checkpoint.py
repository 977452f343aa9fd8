"""Checkpoints: atomic folders with a manifest, a `latest` pointer and retention."""

import pytest
import torch

from cycle_oracle.checkpoint import CheckpointError, CheckpointRecord, latest_checkpoint, load_checkpoint, save_checkpoint


def _record(step, stage="warmup", **kw):
    fields = dict(stage=stage, step=step, model="tiny-random-llama", layer=1,
                  injection={"num_placeholders": 1, "placeholder": " ?", "mode": "replace"}, injection_norm=2.0,
                  weight_version=0, world_size=1)
    fields.update(kw)
    return CheckpointRecord(**fields)


def _save(run_dir, step, keep=2):
    return save_checkpoint(run_dir, _record(step), {"decoder_adapter": {"w": torch.full((2, 2), float(step))}}, keep=keep)


def test_latest_pointer_retention_and_round_trip(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000002", "step-000003"]
    tensors, state, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(tensors["decoder_adapter"]["w"], torch.full((2, 2), 3.0))
    _save(tmp_path, 4, keep=3)
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) == 3


def test_dangling_latest_pointer_and_tampered_file_are_errors(tmp_path):
    path = _save(tmp_path, 1)
    assert latest_checkpoint(tmp_path / "nowhere") is None  # a fresh run has no checkpoint
    (tmp_path / "checkpoints" / "latest").write_text("step-000009")
    with pytest.raises(CheckpointError, match="step-000009"):
        latest_checkpoint(tmp_path)
    (path / "decoder_adapter.safetensors").write_bytes(b"not what was written")
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(path)
