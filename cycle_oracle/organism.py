"""Taboo-style model organisms: train one (a LoRA of the target that hints at a secret word and never
says it) and load one (trained here, or a published adapter by its hub id).

Training is TRL's `SFTTrainer` on the prompt-completion dialogues of `data/taboo.py` (the loss is
the cross-entropy of the assistant's reply tokens only, `completion_only_loss`), with a PEFT LoRA
(`eval.secrets.lora`) on the frozen target:

    L(theta) = - sum_{t in reply} log p_theta(y_t | user turn, y_<t) / |reply tokens|

The secret is in the adapter's weights and nowhere in the prompt: the eval (evals/secrets.py)
reads the organism's activations at the user's turn and asks each oracle for the word.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from cycle_oracle.data.taboo import sft_rows, taboo_dialogues
from cycle_oracle.models import adapter_state, load_causal_lm, load_tokenizer, lora_config


def train_organism(model_path: str | Path, word: str, settings, seed: int = 0, dtype: str = "float32",
                   hints: Mapping[str, Sequence[str]] | None = None, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter state in PEFT naming, report) of the organism of `word`: `settings` is
    `config.SecretSettings` (dialogues_per_word, train_epochs, lr, batch_size, lora)."""
    from datasets import Dataset  # datasets and TRL: heavy, only organism training needs them
    from trl import SFTConfig, SFTTrainer  # (TRL's trainers import accelerate)

    t0 = time.time()
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype).to(device)
    pairs = taboo_dialogues(word, settings.dialogues_per_word, seed, hints)
    dataset = Dataset.from_list(sft_rows(pairs))
    with tempfile.TemporaryDirectory(prefix="organism-") as scratch:  # TRL wants an output_dir; nothing is saved there
        args = SFTConfig(
            output_dir=scratch, num_train_epochs=settings.train_epochs, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.lr, lr_scheduler_type="constant", save_strategy="no", report_to="none",
            logging_strategy="no", disable_tqdm=True, use_cpu=torch.device(device).type == "cpu", seed=seed,
            completion_only_loss=True, max_length=256, dataloader_num_workers=0, bf16=dtype == "bfloat16")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora_config(settings.lora))
        out = trainer.train()
        state = adapter_state(trainer.model)
    report = {"word": word, "dialogues": len(pairs), "steps": int(out.global_step), "train_loss": float(out.training_loss),
              "seconds": round(time.time() - t0, 1), "example": {"user": pairs[0][0], "assistant": pairs[0][1]}}
    return state, report


def load_organism(model_path: str | Path, adapter: str | Path, dtype: str = "float32") -> nn.Module:
    """The target with an organism's LoRA: `adapter` is a PEFT adapter folder (as this eval writes
    them, `<run>/organisms/<word>`) or a hub id of a published one (e.g. a Taboo LoRA of the
    organism's base model on a GPU cluster)."""
    model = PeftModel.from_pretrained(load_causal_lm(model_path, dtype), str(adapter))
    model.eval()
    return model
