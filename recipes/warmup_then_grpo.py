"""`kind: warmup_then_grpo` — the whole pipeline: warmup into `<out>/warmup`, then GRPO from that
checkpoint into `<out>/grpo` (its retrieval eval runs at the end), then the closing report:
`<out>/viewer.html` (every token of one held-out embedded passage described by the GRPO
checkpoint; skipped with one line if it cannot be written) and `<out>/report.md`
(`recipes/report.py`; the CLI prints the same tables). Its `[job]` lines carry the job's ETA
(`recipes/eta.py`): one line after the first warmup steps, then the minutes left at each stage's end.
`<out>/minutes.json` accounts for the job's minutes stage by stage (`JobClock.stage_end`, the
recipes' `on_stage`; `python -m bench.minutes <out>` renders it)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from transformers.utils import logging as hf_logging

from cycle_oracle.corpus import embedded_passages
from cycle_oracle.evals.viewer import describe_texts_to_html
from cycle_oracle.models import resolve_model_path
from recipes import grpo, warmup
from recipes.eta import JobClock, JobPlan, write_minutes
from recipes.report import write_closing_report

VIEWER_MAX_MODEL_BYTES = 2 * 2**30
"""The viewer loads the checkpoint in this (the driver's) process, three copies of the model
(target, decoder, encoder: `load_oracle`), on the CPU; only for models whose weight files are at
most this size (the embedded SmolLM2-135M: 0.5 GiB in fp32). Larger ones print the command instead."""


def run(cfg, out, resume: bool = False) -> dict:
    out = Path(out)
    t0 = time.time()
    warm_budget = f", at most {cfg.warmup.max_minutes:g} min" if cfg.warmup.max_minutes else ""
    budget = f", at most {cfg.grpo.max_minutes:g} min" if cfg.grpo.max_minutes else ""
    print(f"[job] warmup ({cfg.warmup.steps} steps{warm_budget}, held-out eval, encoder warm start) -> GRPO ({cfg.grpo.steps} steps{budget}) "
          f"-> final evals -> report.md")
    clock = JobClock(JobPlan.from_config(cfg), t0)
    warm_cfg = cfg.model_copy(update={"kind": "warmup"})
    warm_dir = out / "warmup"
    done = (warm_dir / "results.json").is_file()
    warm = None if done else warmup.run(warm_cfg, warm_dir, resume=resume, on_step_time=clock.warmup_step, on_stage=clock.stage_end)
    print(f"[job] warmup {'reused' if done else 'done'} at {(time.time() - t0) / 60:.1f} min; GRPO next{clock.left_note('warmup_evals')}")
    grpo_cfg = cfg.model_copy(update={"kind": "grpo", "init_from": str(warm_dir)})
    reuse_activations(warm_dir, out / "grpo")
    result = grpo.run(grpo_cfg, out / "grpo", resume=resume, on_step_end=clock.grpo_step_end, on_stage=clock.stage_end)
    print(f"[job] GRPO and its final evals done at {(time.time() - t0) / 60:.1f} min; the viewer and the report next"
          f"{clock.left_note('final_evals')}")
    summary = {"warmup": (warm or {}).get("summary", "reused from a previous run"), "grpo": result.get("summary")}
    if warm is None:
        warm = read_results(warm_dir / "results.json")
    viewer = write_closing_viewer(cfg, out, result)
    clock.stage_end("viewer", written=viewer is not None)
    write_closing_report(out, result, warm, viewer)
    clock.stage_end("report")
    minutes = write_minutes(clock, cfg, out)
    print(f"[job] done in {(time.time() - t0) / 60:.1f} min; its minutes stage by stage: {minutes} (`python -m bench.minutes {out}`)")
    return {"kind": "warmup_then_grpo", "summary": summary, "warmup": warm, "grpo": result, "viewer": viewer}


def reuse_activations(warm_dir: Path, grpo_dir: Path) -> bool:
    """GRPO reads the warmup's corpus activations: one recipe gives both stages the same corpus,
    documents, model, layer, extraction settings and dtype (GRPO computes in its starting
    checkpoint's), so the warmup's store is linked into `<grpo>/activations` (`extract_store` reuses a
    store it finds there) instead of being extracted again (a Ray task loading the target). -> whether
    it was."""
    src, dst = warm_dir / "activations", grpo_dir / "activations"
    if not (src / "meta.json").is_file() or dst.exists():
        return False

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another file system
            shutil.copy2(a, b)

    grpo_dir.mkdir(parents=True, exist_ok=True)
    tmp = grpo_dir / ".activations.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link_or_copy)
    os.rename(tmp, dst)
    return True


def read_results(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def viewer_passage(grpo_results: dict) -> tuple[str, str]:
    """(doc_id, text) of an embedded passage to view: the first held-out one in the retrieval pool,
    else the first embedded passage (a corpus that is not the embedded one)."""
    passages = {d.doc_id: d.text for d in embedded_passages()}
    for item in (grpo_results.get("retrieval") or {}).get("items") or []:
        if item.get("doc_id") in passages:
            return item["doc_id"], passages[item["doc_id"]]
    doc_id = next(iter(passages))
    return doc_id, passages[doc_id]


def write_closing_viewer(cfg, out: Path, grpo_results: dict, max_model_bytes: int = VIEWER_MAX_MODEL_BYTES) -> str | None:
    """`<out>/viewer.html` for one embedded passage with the final GRPO checkpoint, loaded in this
    process (`describe_texts_to_html`) -> its path, or None after one printed line (too large a
    model, or any failure: the job's results stand without it)."""
    path = out / "viewer.html"
    try:
        doc_id, text = viewer_passage(grpo_results)
        command = f"cycle-oracle describe --checkpoint {out / 'grpo'} --text {json.dumps(text)} --html {path}"
        folder = Path(resolve_model_path(cfg.model.name))
        size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))
        if not size or size > max_model_bytes:
            print(f"[viewer] not written: {cfg.model.name} ({size / 2**30:.1f} GiB of weights) is too large to load three times "
                  f"in the driver; to write it: {command}")
            return None
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # three "Loading weights" bars in the job's closing lines
        try:
            describe_texts_to_html(out / "grpo", [text], path)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        held = any(it.get("doc_id") == doc_id for it in (grpo_results.get("retrieval") or {}).get("items") or [])
        print(f"[viewer] {path}: every token of {doc_id}" + (" (a held-out passage)" if held else ""))
        return str(path)
    except Exception as err:  # the viewer is a convenience: one line, and the job still succeeds
        print(f"[viewer] not written ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})")
        return None
