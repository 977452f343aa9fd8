"""Test helpers shared by test modules (not a test file): checkpoints built in-process."""

from pathlib import Path

import torch


def warmup_like_checkpoint(run_dir: Path, cfg) -> Path:
    """A checkpoint as a warmup writes it (record, a non-identity decoder adapter, an encoder,
    config.yaml), built in-process from the tiny model: GRPO's init_from and eval's --checkpoint
    without running a warmup."""
    from cycle_oracle.checkpoint import CheckpointRecord, save_checkpoint
    from cycle_oracle.config import dump_recipe
    from cycle_oracle.encoder import ActivationEncoder
    from cycle_oracle.files import atomic_write_text
    from cycle_oracle.injection import mean_embedding_norm
    from cycle_oracle.models import adapter_state, attach_lora, load_causal_lm, resolve_model_path

    path = resolve_model_path(cfg.model.name)
    torch.manual_seed(7)
    decoder = attach_lora(load_causal_lm(path), cfg.decoder_lora)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    encoder = ActivationEncoder(load_causal_lm(path), cfg.model.layer, cfg.encoder.lora)
    tensors = {k: v for k, v in encoder.state_dict().items() if "lora_" in k or k.startswith(("scorer", "projection"))}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_recipe(cfg.model_copy(update={"kind": "warmup"})))
    rec = CheckpointRecord(stage="warmup", step=1, model=cfg.model.name, layer=cfg.model.layer, injection=cfg.injection.model_dump(mode="json"),
                           injection_norm=mean_embedding_norm(decoder.get_input_embeddings()), weight_version=0, world_size=1)
    return save_checkpoint(run_dir, rec, {"decoder_adapter": adapter_state(decoder), "encoder": tensors})
