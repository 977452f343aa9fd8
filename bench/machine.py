"""The machine limit: dense matmul FLOP/s (fp32, bf16) and decode-shaped GEMMs, the MFU reference."""

from __future__ import annotations

import time

from bench.load import measure


def matmul_flops(n: int = 2048, dtype: str = "float32", threads: int = 2, reps: int = 10, m: int | None = None, k: int | None = None,
                 quiet_wait_s: float = 0.0) -> dict:
    """Best-of-`reps` FLOP/s of one dense [m x k] @ [k x n] matmul (square n x n by default)."""
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    m = n if m is None else m
    k = n if k is None else k
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dt)
    b = torch.randn(k, n, generator=gen).to(dt)
    torch.matmul(a, b)  # warm-up (thread pool, packing)
    times: list[float] = []

    def once():
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
        return times[-1], None

    rec, _ = measure(once, reps, quiet_wait_s)
    times = sorted(times[-reps:])  # the kept attempt is the last one unless a retry was noisier
    flops = 2.0 * m * n * k
    median = times[len(times) // 2]
    return {"m": m, "k": k, "n": n, "dtype": dtype, "threads": threads, **rec, "best_s": rec["seconds"], "median_s": max(median, rec["seconds"]),
            "flops_per_s": flops / rec["seconds"], "flops_per_s_median": flops / max(median, rec["seconds"])}


def machine_section(threads: int, quick: bool, d_model: int, d_ff: int, quiet_wait_s: float = 0.0) -> dict:
    # imported here: cases run in their own subprocess (bench/case.py); the parent loads no model library
    import torch

    n = 256 if quick else 2048
    q = quiet_wait_s
    out = {"fp32": matmul_flops(n, "float32", threads, reps=5 if quick else 10, quiet_wait_s=q)}
    try:
        bf16_ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        bf16_ok = None
    # bf16 without hardware support (no AVX512-BF16/AMX) runs a slow fallback: a smaller size keeps it short;
    # with it, the same size and repeats as fp32 (the MFU reference of the cases that compute in bf16)
    out["bf16"] = (matmul_flops(n, "bfloat16", threads, reps=5 if quick else 10, quiet_wait_s=q) if bf16_ok
                   else matmul_flops(min(n, 1024), "bfloat16", threads, reps=2, quiet_wait_s=q)) | {"mkldnn_bf16_supported": bf16_ok}
    out["bf16_vs_fp32"] = out["bf16"]["flops_per_s"] / out["fp32"]["flops_per_s"]
    if out["bf16"]["n"] != n:
        out["fp32_same_size_as_bf16"] = matmul_flops(out["bf16"]["n"], "float32", threads, reps=10, quiet_wait_s=q)
        out["bf16_vs_fp32"] = out["bf16"]["flops_per_s"] / out["fp32_same_size_as_bf16"]["flops_per_s"]
    # Decode-shaped GEMMs: M rows (sequences in flight) through one MLP up-projection of the model.
    out["decode_gemm"] = [matmul_flops(d_ff, "float32", threads, reps=5 if quick else 20, m=mrows, k=d_model, quiet_wait_s=q)
                          for mrows in ((1, 16) if quick else (1, 4, 16, 64, 256))]
    return out
