"""py-spy raw stacks of a case subprocess -> where its time went (categories, leaves, Python frames)."""

from __future__ import annotations

from pathlib import Path


def _category(leaf: str, stack: list[str]) -> str:
    low = leaf.lower()
    if leaf.endswith("(?)"):  # no symbol: code generated at run time (oneDNN's JIT GEMM kernels, under vLLM-CPU's linear layers)
        return "unsymbolised native (runtime-JIT kernels: oneDNN GEMM)"
    if any(x in low for x in ("sgemm", "gemm", "mkl_blas", "brgemm", "dnnl", "onednn", "jit_avx", "jit_uni", "matmul", "mkldnn")):
        return "gemm (MKL/oneDNN kernels)"
    if any("attention" in f.lower() or "sdpa" in f.lower() for f in stack[-6:]):
        return "attention"
    if ".py:" in leaf:
        return "python interpreter"
    if any(x in low for x in ("sched_yield", "futex", "kmp_", "gomp", "omp_", "__kmp", "pthread_cond", "nanosleep", "poll", "epoll")):
        return "OpenMP / sync / waiting"
    if any(x in low for x in ("memcpy", "memset", "memmove", "copy_", "clone", "cat_", "index")):
        return "copies / indexing"
    return "other native (elementwise, allocator, ...)"


PROFILE_FOCUS = {
    "engine": ("LLM.generate (vllm/", "RolloutEngine.generate (", "RolloutEngine.load_merged_weights ("),
    "hf": ("GenerationMixin.generate (transformers/",),
    "encoder": ("EncoderTrainer.score (", "EncoderTrainer.train_step ("),
    "learner": ("DecoderLearner.update_shard (", "DecoderLearner.policy_logprobs (", "DecoderLearner.reference_logprobs ("),
    "sft": ("DecoderLearner.sft_micro_step (",),
}


def summarise_profile(path: Path, focus: tuple[str, ...] = (), top: int = 15) -> dict:
    """py-spy raw (collapsed) stacks -> category shares, top leaf functions and top Python frames,
    over the stacks that contain one of the `focus` frames (the measured calls; set-up excluded)."""
    cats: dict[str, int] = {}
    leaves: dict[str, int] = {}
    py_frames: dict[str, int] = {}
    total = everything = 0
    for line in path.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        n = int(count)
        everything += n
        if focus and not any(f in stack_text for f in focus):
            continue
        stack = stack_text.split(";")
        total += n
        leaf = stack[-1]
        cats[_category(leaf, stack)] = cats.get(_category(leaf, stack), 0) + n
        leaves[leaf] = leaves.get(leaf, 0) + n
        py = [f for f in stack if ".py:" in f]
        for f in set(f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" for f in py if " (" in f):
            py_frames[f] = py_frames.get(f, 0) + n
    share = lambda d: [{"frame": k, "share": v / total} for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []
    return {"samples": total, "focus": list(focus), "focus_share_of_all_samples": total / everything if everything else 0.0, "categories": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])} if total else {},
            "top_leaves": share(leaves), "top_python_inclusive": share(py_frames),
            "note": "main-thread samples of the case process (py-spy --native, 25 Hz); OpenMP worker threads have no Python stack and are not sampled"}
