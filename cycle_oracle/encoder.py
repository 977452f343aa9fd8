"""The encoder: description text -> reconstruction of the activation, and its losses and metrics.

Architecture: the target's first L blocks (no final norm, so its hidden states live in the read
layer's space) with LoRA, then attention pooling and a d x d projection initialised to identity:

    h = blocks_{1..L}(description tokens)                    [B, T, d]
    w = softmax_t( score(h_t) ) over description tokens only  (template / BOS / padding masked)
    v_hat = P (sum_t w_t h_t) + b,  P = I, b = 0 at init     [B, d]

so before training the reconstruction is the pooled hidden state (tested).

An empty description (nothing but whitespace) has no tokens to pool over. The one rule, wherever a
description is encoded (`reconstruct_texts`: GRPO's final evals through the encoder actor,
`cycle-oracle eval` through the HF oracle): its reconstruction is v_hat = 0, which has cosine 0
with every activation and ranks last in retrieval. GRPO's training reward does not encode it at
all: an empty description is an unusable sample and gets its group's penalty (`grpo.unusable_rewards`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cycle_oracle.activations import pad_right
from cycle_oracle.devices import model_device, to_cpu
from cycle_oracle.models import attach_lora, d_model, truncate_to_layer


class ActivationEncoder(nn.Module):
    def __init__(self, base_lm: nn.Module, layer: int, lora_settings=None):
        super().__init__()
        width = d_model(base_lm)
        trunk = truncate_to_layer(base_lm, layer)
        for p in trunk.parameters():
            p.requires_grad_(False)
        self.trunk = attach_lora(trunk, lora_settings, task_type=None) if lora_settings is not None else trunk
        self.layer = layer
        self.scorer = nn.Linear(width, 1)
        nn.init.zeros_(self.scorer.weight)  # uniform pooling at init
        nn.init.zeros_(self.scorer.bias)
        self.projection = nn.Linear(width, width)
        with torch.no_grad():
            self.projection.weight.copy_(torch.eye(width))
            self.projection.bias.zero_()

    @property
    def d_model(self) -> int:
        return self.projection.in_features

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor):
        """ids/masks [B, T] -> (v_hat [B, d], pooling weights [B, T] (zero off the description))."""
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state.float()
        return self.pool_and_project(hidden, pool_mask)

    def pool_and_project(self, hidden: torch.Tensor, pool_mask: torch.Tensor):
        if pool_mask.device.type != "meta" and not pool_mask.any(dim=1).all():  # (meta: device checks hold no values)
            raise ValueError("a description has no tokens to pool over (empty description)")
        scores = self.scorer(hidden).squeeze(-1).masked_fill(~pool_mask.bool(), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bt,btd->bd", weights, hidden)
        return self.projection(pooled), weights


def encoder_inputs(tokenizer, descriptions: Sequence[str], prefix: str = "Description: ", max_tokens: int = 128):
    """Descriptions -> (ids [B, T], attention_mask [B, T], pool_mask [B, T]).

    The encoder reads `prefix + description`; the pool mask covers only the description's tokens
    (BOS / prefix / padding are excluded)."""
    seqs, masks = [], []
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=True) if prefix else []
    for text in descriptions:
        body = tokenizer.encode(text.strip(), add_special_tokens=False)[:max_tokens] if text and text.strip() else []
        if not body:
            raise ValueError(f"empty description cannot be encoded: {text!r}")
        seqs.append(prefix_ids + body)
        masks.append([0] * len(prefix_ids) + [1] * len(body))
    ids, attn = pad_right(seqs, tokenizer.pad_token_id)
    pool, _ = pad_right(masks, 0)
    return ids, attn, pool.bool()


def is_empty(description: str | None) -> bool:
    """True for a description with nothing to encode (None, "", whitespace)."""
    return not (description and description.strip())


@torch.no_grad()
def reconstruct_texts(encoder: ActivationEncoder, tokenizer, texts: Sequence[str], prefix: str = "Description: ", max_tokens: int = 128,
                      batch_size: int = 32) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The one way descriptions are encoded outside training (eval mode, no gradient):
    texts [N] -> (v_hat [N, d] float32 on the CPU, per text the token ids [T_i] it pooled over and
    their pooling weights [T_i], summing to 1). An empty text gets v_hat = 0 and no tokens (the
    module docstring's rule)."""
    encoder.eval()
    device = model_device(encoder)
    v_hat = to_cpu(torch.zeros(len(texts), encoder.d_model, device=device))  # on the CPU (a meta encoder's stays meta: `to_cpu`)
    token_ids = [torch.zeros(0, dtype=torch.long) for _ in texts]
    weights = [torch.zeros(0) for _ in texts]
    described = [i for i, text in enumerate(texts) if not is_empty(text)]
    for start in range(0, len(described), batch_size):
        idx = described[start : start + batch_size]
        ids, attn, pool = (t.to(device) for t in encoder_inputs(tokenizer, [texts[i] for i in idx], prefix, max_tokens))
        out, w = encoder(ids, attn, pool)
        v_hat[idx] = to_cpu(out.float())
        for row, i in enumerate(idx):
            token_ids[i], weights[i] = to_cpu(ids[row][pool[row]]), to_cpu(w[row][pool[row]].float())
    return v_hat, token_ids, weights


# ---- losses -------------------------------------------------------------------------------

def cosine_loss(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L = mean_b (1 - cos(v_hat_b, v_b)).   [B, d], [B, d] -> scalar."""
    return (1.0 - F.cosine_similarity(v_hat, v, dim=-1)).mean()


def rescale_to_sqrt_d(x: torch.Tensor) -> torch.Tensor:
    """x * sqrt(d) / ||x||: every vector gets norm sqrt(d) (NLA's convention)."""
    return x * (x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def scaled_mse_loss(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """L = mean_b ||r(v_hat_b) - r(v_b)||^2 / d with r(x) = sqrt(d) x/||x||.

    ||r(a) - r(b)||^2 = 2d (1 - cos(a, b)), so L = 2 (1 - cos): NLA's loss, equal to the cosine
    loss up to a factor 2."""
    return ((rescale_to_sqrt_d(v_hat) - rescale_to_sqrt_d(v)) ** 2).sum(-1).mean() / v.shape[-1]


def reconstruction_loss(kind: str, v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if kind == "cosine":
        return cosine_loss(v_hat, v)
    if kind == "scaled_mse":
        return scaled_mse_loss(v_hat, v)
    raise ValueError(f"encoder loss {kind!r}; expected 'cosine' or 'scaled_mse'")


# ---- metrics ------------------------------------------------------------------------------

def cosine(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-row cosine [B]."""
    return F.cosine_similarity(v_hat.float(), v.float(), dim=-1)


def centred_cosine(v_hat: torch.Tensor, v: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """cos(v_hat - mu, v - mu) per row [B]: the cosine after subtracting the corpus mean mu."""
    return cosine(v_hat - mean, v - mean)


def fve(v_hat: torch.Tensor, v: torch.Tensor, mean: torch.Tensor) -> float:
    """Fraction of variance explained against predicting the mean, on sqrt(d)-rescaled vectors:

        FVE = 1 - sum_b ||r(v_hat_b) - r(v_b)||^2 / sum_b ||r(mu) - r(v_b)||^2

    0 = no better than predicting the corpus mean mu for every activation; 1 = perfect."""
    r_hat, r_v = rescale_to_sqrt_d(v_hat.float()), rescale_to_sqrt_d(v.float())
    r_mu = rescale_to_sqrt_d(mean.float()[None, :]).expand_as(r_v)
    err = ((r_hat - r_v) ** 2).sum()
    base = ((r_mu - r_v) ** 2).sum().clamp_min(1e-12)
    return float(1.0 - err / base)


def reconstruction_metrics(v_hat: torch.Tensor, v: torch.Tensor, mean: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """cosine, centred cosine and FVE, next to the predict-the-mean floor for the same rows."""
    mean_pred = mean[None, :].expand_as(v)
    return {
        f"{prefix}cosine": float(cosine(v_hat, v).mean()),
        f"{prefix}centred_cosine": float(centred_cosine(v_hat, v, mean).mean()),
        f"{prefix}fve": fve(v_hat, v, mean),
        f"{prefix}mean_baseline_cosine": float(cosine(mean_pred, v).mean()),
    }
