"""Which injection scale should be the default? A measurement on the untrained decoder.

For each scale setting, inject N corpus activations (layer L of the target) into the description
prompt and look at the decoder's distribution over the first answer token:

  sensitivity = mean over pairs (i, j) of JS(p_i || p_j)   how much the output depends on *which*
                                                           activation was injected (0 = ignores it)
  disruption  = mean_i KL(p_i || p_plain)                  how far injection moves the output from the
                                                           prompt with the plain placeholder token
  entropy     = mean_i H(p_i)                              collapse (very low) or noise (very high)

A good starting point reads the activation (sensitivity clearly above 0) without wrecking the
prompt (disruption moderate, entropy near the plain prompt's). Writes JSON to stdout or --out.

    .venv/bin/python -m experiments.injection_scale.measure_injection_scale --model smollm2-135m-instruct --layer 0.5
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cycle_oracle.activations import extract
from cycle_oracle.config import DEFAULT_DESCRIPTION_INSTRUCTION, InjectionSettings
from cycle_oracle.corpus import embedded_passages
from cycle_oracle.injection import build_decoder_prompt, decoder_inputs, mean_embedding_norm, target_norm
from cycle_oracle.models import load_causal_lm, load_tokenizer, num_layers, resolve_layer, resolve_model_path

SETTINGS = [
    ("embedding_norm", 0.5), ("embedding_norm", 1.0), ("embedding_norm", 2.0), ("embedding_norm", 4.0),
    ("embedding_norm", 8.0), ("layer_norm", 1.0), ("layer_norm", 0.1),
]


def first_token_distribution(model, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, -1].float()
    return torch.log_softmax(logits, -1)


def js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    m = torch.logsumexp(torch.stack([logp, logq]), 0) - torch.log(torch.tensor(2.0))
    return 0.5 * ((logp.exp() * (logp - m)).sum(-1) + (logq.exp() * (logq - m)).sum(-1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", default="0.5")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tok, model = load_tokenizer(path), load_causal_lm(path)
    layer = resolve_layer(float(args.layer) if "." in args.layer else int(args.layer), num_layers(model))
    docs = embedded_passages()[: args.n]
    acts = torch.cat([a for a, _, _ in extract(model, tok, docs, layer, "last", progress=False)])
    layer_norm = float(acts.norm(dim=-1).mean())
    emb_norm = mean_embedding_norm(model.get_input_embeddings())
    prompt = build_decoder_prompt(tok, layer, DEFAULT_DESCRIPTION_INSTRUCTION)
    ids = torch.tensor([prompt.input_ids])
    plain = first_token_distribution(model, model.get_input_embeddings()(ids))
    rows = []
    for scale, factor in SETTINGS:
        s = InjectionSettings(scale=scale, scale_factor=factor)
        norm = target_norm(s, emb_norm, layer_norm)
        embeds = decoder_inputs(model.get_input_embeddings(), [prompt.input_ids] * len(acts), [prompt.placeholder_positions] * len(acts), acts, norm)
        logp = first_token_distribution(model, embeds)
        pairs = [(i, j) for i in range(len(acts)) for j in range(i + 1, len(acts))]
        sens = torch.stack([js(logp[i], logp[j]) for i, j in pairs]).mean()
        disruption = (logp.exp() * (logp - plain)).sum(-1).mean()
        entropy = -(logp.exp() * logp).sum(-1).mean()
        rows.append({"scale": scale, "scale_factor": factor, "injected_norm": norm, "sensitivity_js": float(sens),
                     "disruption_kl": float(disruption), "entropy": float(entropy)})
    result = {"model": args.model, "layer": layer, "n_activations": len(acts), "embedding_norm": emb_norm,
              "layer_mean_norm": layer_norm, "plain_prompt_entropy": float(-(plain.exp() * plain).sum()),
              "time": time.strftime("%Y-%m-%d %H:%M"), "settings": rows}
    text = json.dumps(result, indent=2)
    if args.out:
        open(args.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
