"""Text generation by the target model for data building, and the JSONL cache of what it wrote.

Builders never load a model themselves: they take a `generate_fn(chats, max_new_tokens) -> texts`
where `chats` is a list of chat-message lists (`[{"role": ..., "content": ...}, ...]`) and the
result is one completion string per chat (the assistant's reply, special tokens removed). The
caller picks the engine: `hf_generate_fn(model, tokenizer, batch_size)` or `vllm_generate_fn(model_path)`.

Generated data is cached as JSONL under `cache_root()/data/<kind>/<key>.jsonl`, the key hashing
everything the output depends on (model id, seed, sizes, the embedded text files). The file is
written atomically, so an interrupted build leaves no cache and the next call rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cycle_oracle.data.items import log
from cycle_oracle.devices import model_device
from cycle_oracle.files import atomic_write
from cycle_oracle.models import cache_root, render_chat

Chat = list[dict]
GenerateFn = Callable[[Sequence[Chat], int], list[str]]


def hf_generate_fn(
    model,
    tokenizer,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> GenerateFn:
    """Batched HF generation with LEFT padding (greedy by default; sampled runs are seeded per batch).

    Returns `generate(chats, max_new_tokens) -> list[str]`, one reply per chat, cut at the first
    end-of-turn token, special tokens removed, stripped. `generate.model_id` names the model (used
    in cache keys) and `generate.batch_size` tells callers how to chunk their progress bars.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = {tokenizer.eos_token_id, pad_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        stop_ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    stop_ids.discard(None)
    calls = {"n": 0}

    @torch.inference_mode()
    def generate(chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        out: list[str] = []
        device = model_device(model)  # inputs follow the model (the task's GPU, or the CPU)
        for start in range(0, len(chats), batch_size):
            batch = chats[start : start + batch_size]
            texts = [render_chat(tokenizer, c) for c in batch]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
            kwargs = dict(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=sorted(stop_ids),
                do_sample=do_sample,
            )
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:  # silence "temperature is set but do_sample=False" from the model's generation config
                kwargs.update(temperature=None, top_p=None, top_k=None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + calls["n"])
                calls["n"] += 1
                generated = model.generate(**kwargs)
            new = generated[:, enc["input_ids"].shape[1] :].tolist()
            for row in new:
                cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return out

    generate.model_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    generate.batch_size = batch_size
    return generate


def vllm_generate_fn(model_path: str, seed: int = 0, max_model_len: int = 1024, dtype: str = "float32") -> GenerateFn:
    """Greedy generation through a vLLM engine (plain token prompts, no prompt embeds): the fast
    path for building warmup data. Same contract as `hf_generate_fn`; greedy replies can differ
    from HF's in the last digits, so the cache key names the engine (`model_id` ends in `@vllm`).
    Create it inside a Ray task/actor or under `if __name__ == "__main__"` (vLLM's rule)."""
    engine: dict = {}

    def generate(chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        from vllm import LLM, SamplingParams  # vLLM: heavy, and it reads the environment the actor sets first
        from vllm.inputs import TokensPrompt  # vLLM: heavy, and it reads the environment the actor sets first

        if "llm" not in engine:  # started on first use: a fully cached build never pays for it
            engine["llm"] = LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, seed=seed)
        llm = engine["llm"]
        tokenizer = llm.get_tokenizer()
        prompts = []
        for chat in chats:
            ids = render_chat(tokenizer, chat, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            if len(ids) + max_new_tokens > max_model_len:
                raise ValueError(f"chat of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the engine's max_model_len {max_model_len}")
            prompts.append(TokensPrompt(prompt_token_ids=ids))
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]

    generate.model_id = f"{model_path}@vllm"
    generate.batch_size = 64
    return generate


def run_generation(
    generate_fn: GenerateFn,
    chats: Sequence[Chat],
    max_new_tokens: int,
    description: str,
    progress: bool = True,
    chunk_size: int | None = None,
) -> list[str]:
    """Call generate_fn in chunks with a rich progress bar; check it returned one string per chat."""
    chunk = chunk_size or int(getattr(generate_fn, "batch_size", 8) or 8)
    results: list[str] = []
    t0 = time.time()

    def one(part):
        texts = generate_fn(list(part), max_new_tokens)
        if len(texts) != len(part):
            raise ValueError(f"generate_fn returned {len(texts)} texts for {len(part)} chats")
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"generate_fn must return strings, got {bad[:3]}")
        results.extend(texts)

    parts = [chats[i : i + chunk] for i in range(0, len(chats), chunk)]
    if progress and parts:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar:
            task = bar.add_task(description, total=len(chats))
            for part in parts:
                one(part)
                bar.update(task, advance=len(part))
    else:
        for part in parts:
            one(part)
    log.info("%s: %d generations in %.1fs", description, len(chats), time.time() - t0)
    return results


def resolve_model_id(generate_fn, tokenizer=None, model_id: str | None = None) -> str:
    """The model id for cache keys: explicit > generate_fn.model_id > tokenizer.name_or_path."""
    if model_id:
        return str(model_id)
    mid = getattr(generate_fn, "model_id", None)
    if mid:
        return str(mid)
    name = getattr(tokenizer, "name_or_path", None)
    if name:
        return str(name)
    raise ValueError("cannot tell which model generates the data: pass model_id=... (it keys the data cache)")


def tokenizer_fingerprint(tokenizer) -> str:
    """Token positions in cached records depend on the tokenizer: a short fingerprint for cache keys."""
    probe = "The quick brown fox — 1234 jumps; ÉTÉ 夏."
    ids = tokenizer.encode(probe, add_special_tokens=False)
    return hashlib.sha256(json.dumps([len(tokenizer), ids]).encode()).hexdigest()[:12]


def cache_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def cache_file(cache_dir: str | Path | None, kind: str, payload: dict) -> Path:
    """`<cache_dir or cache_root()/data>/<kind>/<readable prefix>-<hash>.jsonl`."""
    if cache_dir is None:
        cache_dir = cache_root() / "data"
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(payload.get("model_id", "model"))).name)[:40]
    return Path(cache_dir) / kind / f"{model}-seed{payload.get('seed', 0)}-{cache_key(payload)}.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict], meta: dict) -> None:
    """Rows as JSONL plus `<name>.meta.json` (what built it, for people), each written atomically:
    a reader that finds the JSONL finds all of its rows."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    atomic_write(path.with_suffix(".meta.json"), lambda p: p.write_text(json.dumps(meta, indent=2), encoding="utf-8"))


def text_digest(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]
