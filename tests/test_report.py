"""The closing report (`recipes/report.py`) on results dicts built by the real code: retrieval blocks
from `evaluate_retrieval` on a small real ActivationStore with fake oracles, the GRPO run's layout
from `cycle_oracle/evals/final.py` (`decoder_comparison`, `final_summary`, the keys of `final_evals`), the
warmup's held-out eval from `heldout_eval` with fake scorers; all through JSON as results.json is."""

import io
import json

import pytest
import torch
from rich.console import Console

from cycle_oracle.activations import write_store
from cycle_oracle.evals.oracle import Oracle
from cycle_oracle.evals.retrieval import evaluate_retrieval
from recipes.report import closing_report, report_from_results, write_closing_report

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, DOCS, TOKENS = 16, 60, 8
TEMPLATE = "The text is about a new product launch, with a focus on sustainable fashion."


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """60 documents of 8 tokens (ids 100k + j), activations at tokens 3 and 6: mean offset + noise."""
    g = torch.Generator().manual_seed(0)
    acts, recs, docs = [], [], {}
    for k in range(DOCS):
        docs[f"doc:{k}"] = [100 * k + j for j in range(TOKENS)]
        for i in (3, 6):
            acts.append(2.0 + torch.randn(D, generator=g))
            recs.append({"doc_id": f"doc:{k}", "group": f"doc:{k}", "token_index": i, "token": f" t{100 * k + i}"})
    return write_store(tmp_path_factory.mktemp("store"), [(torch.stack(acts), recs, docs)], "fake", 1)


def oracle(store, noise, seed: int = 0) -> Oracle:
    """describe(v) names v's row ("about row i"); encode gives that row's activation plus `noise`
    ("template": every description is the same sentence, like an untrained decoder's). A context window
    ("ctx <ids>") encodes to its row with noise 0.5 (the context-only ceiling)."""
    row_of = {tuple(v.tolist()): i for i, v in enumerate(store.activations)}
    row_of_last_token = {(100 * int(r["doc_id"].split(":")[1]) + r["token_index"]): i for i, r in enumerate(store.records)}

    def describe(vectors):
        if noise == "template":
            return [TEMPLATE] * len(vectors)
        return [f"about row {row_of[tuple(v.tolist())]}" if tuple(v.tolist()) in row_of else "nothing in particular" for v in vectors]

    def encode(texts):
        g = torch.Generator().manual_seed(seed)
        out = []
        for t in texts:
            if t.startswith("about row "):
                out.append(store.activations[int(t.split()[-1])] + noise * torch.randn(D, generator=g))
            elif t.startswith("ctx "):
                out.append(store.activations[row_of_last_token[int(t.split()[-1])]] + 0.5 * torch.randn(D, generator=g))
            else:  # a template: one fixed vector
                out.append(store.mean + torch.randn(D, generator=torch.Generator().manual_seed(len(t))))
        return torch.stack(out)

    return Oracle(describe=describe, encode=encode, encode_with_weights=None, ask_yes_no=None, read=None,
                  detokenize=lambda ids: "ctx " + " ".join(str(i) for i in ids))


def retrieval(o, store, controls=("shuffled", "zero", "context_only")):
    return evaluate_retrieval(o, store, 40, 0, heldout_fraction=0.5, split_seed=0, controls=controls)


def grpo_results(store, grpo_noise, warm_noise, frozen_grpo_noise=None, frozen_warm_noise=None, init_from=True) -> dict:
    """A GRPO run's results.json as `recipes/grpo.py` writes it (`run` + `evals/final.final_evals`)."""
    from cycle_oracle.evals.final import decoder_comparison, final_summary

    results = {"kind": "grpo", "layer": 15, "injection_norm": 3.2, "steps": 8, "steps_planned": 8, "weight_version": 9, "role_restarts": 0}
    out = {"retrieval": retrieval(oracle(store, grpo_noise, seed=1), store)}
    if init_from:
        g = retrieval(oracle(store, frozen_grpo_noise if frozen_grpo_noise is not None else grpo_noise, seed=2), store, controls=())
        w = retrieval(oracle(store, frozen_warm_noise if frozen_warm_noise is not None else warm_noise, seed=3), store, controls=())
        out["frozen_start_encoder"] = {"grpo_decoder": g, "warmup_decoder": w, "grpo_minus_warmup": decoder_comparison(g, w)}
        out["retrieval_warmup_decoder"] = retrieval(oracle(store, warm_noise, seed=4), store, controls=())
        out["grpo_minus_warmup"] = decoder_comparison(out["retrieval"], out["retrieval_warmup_decoder"])
    results.update(out)
    results["summary"] = final_summary(results)
    return json.loads(json.dumps(results, default=float))  # as results.json holds it


def warmup_results(reads: bool) -> dict:
    """A warmup's results.json: `heldout_eval` with a scorer that reads the activation (or ignores it)."""
    from cycle_oracle.config import RecipeConfig
    from cycle_oracle.data.items import WarmupItem
    from cycle_oracle.encoder import reconstruction_metrics
    from cycle_oracle.evals.warmup import heldout_eval
    from recipes.warmup import warmup_summary

    def item(task, b, j, question):
        return WarmupItem(task, f"b{b}", (100 + b, j, 7, 8, 9), (2, 3, 4), question, f"answer {b}")

    def score(examples, vector_override=None):
        nll = []
        for ex in examples:
            own = ex.context_ids[0] == 100 + int(ex.answer.split()[-1])
            nll.append(2.0 if vector_override == "zero" else (0.5 if own else 1.5) if reads else 1.0)
        return {"nll": nll, "token_accuracy": [float(v == 0.5) for v in nll]}

    heldout = {"latentqa": [item("latentqa", b, j, q) for b in range(6) for q in ("Q1?", "Q2?") for j in range(3)],
               "token_prediction": [item("token_prediction", b, j, "What comes next?") for b in range(6) for j in range(4)],
               "description": [item("description", b, j, "Describe.") for b in range(6) for j in range(2)]}
    cfg = RecipeConfig(kind="warmup", injection={"num_placeholders": 2}, warmup={"eval_items": 12})
    g = torch.Generator().manual_seed(0)
    v, mean = 2 + torch.randn(20, D, generator=g), torch.full((D,), 2.0)
    recon = lambda s: reconstruction_metrics(v + s * torch.randn(20, D, generator=g), v, mean)  # noqa: E731
    results = {"kind": "warmup", "data": {"tasks": list(heldout)}, "injection_norm": 3.2, "layer": 15, "latentqa_centring": None,
               "heldout": heldout_eval(score, heldout, cfg, 1),
               "encoder_warm_start": {"heldout_source_window": recon(0.5), "heldout_before": recon(3.0), "heldout_after": recon(1.0),
                                      "train_pairs": 192, "heldout_pairs": 20, "encoder_loss_first": 0.9, "encoder_loss_last": 0.4}}
    results["summary"] = warmup_summary(results)
    return json.loads(json.dumps(results, default=float))


def rendered(report, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, record=True)
    report.print(console)
    return console.export_text()


def test_the_report_of_a_good_warmup_then_grpo_job(store):
    grpo, warm = grpo_results(store, grpo_noise=0.3, warm_noise=3.0), warmup_results(reads=True)
    report = closing_report(grpo, warm, viewer="runs/main/viewer.html")
    frozen = grpo["frozen_start_encoder"]["grpo_decoder"]
    n, top1 = frozen["n"], frozen["conditions"]["description"]["top1"]
    assert n >= 20 and top1 > 0.5
    v = report.verdict
    assert v.startswith(f"GRPO decoder top-1 {top1:.3f} vs chance {1 / n:.3f} on {n} held-out activations")
    assert "above chance" in v and "under the frozen starting encoder" in v
    assert "better than the warmup decoder" in v and "interval excludes 0" in v and "\n" not in v

    md = report.markdown
    assert md.startswith("# Run report") and f"**Verdict:** {v}" in md
    assert f"## Retrieval: pick the described activation out of N = {n} held-out activations" in md
    assert "| decoder / condition | top-1 [95% CI] | × chance | top-5 | cosine | centred cosine |" in md
    assert md.index("under the frozen starting encoder") < md.index("under the final (co-trained) encoder")
    for label in ("GRPO decoder", "warmup decoder", "shuffled control", "zero control", "context only (ceiling)", "predict the mean (floor)"):
        assert f"| {label} |" in md
    assert f"| chance (1/{n}, 5/{n}) | {1 / n:.3f} | 1.0× | {5 / n:.3f} |" in md
    assert f"| GRPO decoder | {top1:.3f} [" in md  # frozen first: its row is the first GRPO row
    diff = grpo["frozen_start_encoder"]["grpo_minus_warmup"]["centred_cosine"]
    assert f"| centred cosine | {diff['mean']:+.3f} | [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] |" in md
    assert "| top-1 | +" in md and "above 0" in md

    # the warmup's held-out gaps with their intervals and item counts
    lqa = warm["heldout"]["latentqa"]
    assert "## Warmup, held-out: does the decoder read the activation?" in md
    assert (f"| LatentQA: answer NLL | {lqa['nll_real']:.3f} | {lqa['nll_shuffled']:.3f} | {lqa['nll_zero']:.3f} | "
            f"{lqa['nll_gap_shuffled_minus_real']:+.3f} [{lqa['nll_gap_ci_low']:+.3f}, {lqa['nll_gap_ci_high']:+.3f}] | "
            f"{lqa['items']} ({lqa['sources']}) | yes |") in md
    assert "| LatentQA: true answer ranked first |" in md and "| token prediction: answer NLL |" in md and "| description: answer NLL |" in md
    assert "Encoder warm start" in md

    # five examples next to their source text; the viewer
    items = frozen["items"][:5]
    assert "## Examples: the first 5 items of the pool" in md
    for it in items:
        assert it["description"] in md and it["context"][-20:] in md
    assert md.count("about row ") >= 10  # GRPO's and the warmup decoder's descriptions
    assert "`runs/main/viewer.html`" in md

    # the terminal shows the same verdict and tables; the CLI's entry point builds the same report
    text = rendered(report)
    assert "Verdict:" in text and "Retrieval: pick the described activation" in text and "Warmup, held-out" in text
    again = report_from_results({"kind": "warmup_then_grpo", "summary": {}, "warmup": warm, "grpo": grpo, "viewer": "runs/main/viewer.html"})
    assert again.markdown == md
    assert rendered(report, width=80)  # a narrow terminal (or a log file) wraps, never fails


def test_a_warmup_stopped_by_its_budget_says_so(store):
    grpo, warm = grpo_results(store, grpo_noise=0.3, warm_noise=3.0), warmup_results(reads=True)
    assert not any("Warmup:" in line for line in closing_report(grpo, {**warm, "steps": 5, "steps_planned": 5}).header)
    stopped = closing_report(grpo, {**warm, "steps": 3, "steps_planned": 5})
    assert "Warmup: 3 of 5 steps (stopped early by warmup.max_minutes)." in stopped.header and "stopped early by warmup" in stopped.markdown


def test_chance_level_results_say_so(store):
    grpo, warm = grpo_results(store, grpo_noise="template", warm_noise="template"), warmup_results(reads=False)
    report = closing_report(grpo, warm)
    n = grpo["retrieval"]["n"]
    assert grpo["frozen_start_encoder"]["grpo_decoder"]["conditions"]["description"]["top1"] == pytest.approx(1 / n)
    assert "no better than chance" in report.verdict and "above chance" not in report.verdict
    assert "not distinguishable from the warmup decoder" in report.verdict and "interval includes 0" in report.verdict
    md = report.markdown
    assert "| yes |" not in md and "cannot tell" in md  # a blind decoder: no held-out gap
    assert "includes 0" in md


def test_a_grpo_decoder_worse_than_the_warmup_decoder_says_worse(store):
    report = closing_report(grpo_results(store, grpo_noise=3.0, warm_noise=0.3), warmup_results(reads=True))
    assert "worse than the warmup decoder" in report.verdict and "interval excludes 0" in report.verdict
    assert "below 0" in report.markdown


def test_the_frozen_encoder_comparison_leads_the_verdict(store):
    """Under the co-trained final encoder GRPO wins; under the frozen starting encoder it does not: the verdict follows the frozen one."""
    grpo = grpo_results(store, grpo_noise=0.3, warm_noise=3.0, frozen_grpo_noise="template", frozen_warm_noise="template")
    report = closing_report(grpo, None)
    assert "no better than chance" in report.verdict and "under the frozen starting encoder" in report.verdict
    assert "better than" not in report.verdict.replace("no better than chance", "")
    final = grpo["grpo_minus_warmup"]["centred_cosine"]
    assert final["ci_low"] > 0 and f"{final['mean']:+.3f}" in report.markdown  # still shown, under the final encoder
    assert "Warmup held-out gaps: not in this report" in report.markdown and "## Warmup" not in report.markdown


def test_a_grpo_only_job(store):
    grpo = grpo_results(store, grpo_noise=0.3, warm_noise="template", init_from=False)
    report = report_from_results(grpo)
    v = report.verdict
    assert "above chance" in v and "under the final (co-trained) encoder, which favours its outputs" in v
    assert "no warmup decoder to compare with" in v
    md = report.markdown
    assert "| shuffled control |" in md and "| context only (ceiling) |" in md and "| warmup decoder |" not in md
    assert "GRPO decoder minus warmup decoder" not in md and "## Warmup" not in md and "Warmup held-out gaps" not in md
    assert "No frozen-encoder comparison" in md and "## Examples" in md and "## Viewer" not in md
    assert "warmup decoder's description" not in md


def test_missing_optional_parts_are_left_out(store):
    grpo = grpo_results(store, grpo_noise=0.3, warm_noise=3.0)
    for block in (grpo["retrieval"], grpo["retrieval_warmup_decoder"], *grpo["frozen_start_encoder"].values()):
        for key in ("per_item", "items", "pool", "rows", "text_controls", "zero_description"):
            block.pop(key, None)
    for cond in ("shuffled", "zero", "context_only"):
        grpo["retrieval"]["conditions"].pop(cond)
    grpo["retrieval"]["conditions"]["description"]["centred_cosine"] = None  # NaN is written as null
    grpo.pop("steps_planned")
    warm = {"kind": "warmup", "heldout": {"token_prediction": {"nll_real": 1.0, "items": 3}}}
    report = closing_report(grpo, warm)
    md = report.markdown
    assert "above chance" in report.verdict  # top-1 x N stands in for the per-item ranks
    assert "## Examples" not in md and "| top-1 |" not in md and "| shuffled control |" not in md
    assert "| centred cosine |" in md  # the stored differences are still there
    assert "| token prediction: answer NLL | 1.000 | – | – | – | 3 | – |" in md
    assert rendered(report)

    empty = closing_report({})
    assert empty.verdict.startswith("no retrieval results") and empty.markdown.startswith("# Run report")
    assert report_from_results({"kind": "describe", "summary": {}}) is None and report_from_results(None) is None


def test_write_closing_report_is_atomic_and_never_fails_the_job(store, tmp_path, capsys):
    grpo = grpo_results(store, grpo_noise=0.3, warm_noise=3.0, init_from=False)
    capsys.readouterr()
    path = write_closing_report(tmp_path, grpo)
    assert path == tmp_path / "report.md" and path.read_text() == closing_report(grpo).markdown
    assert not list(tmp_path.glob(".*.tmp"))
    assert write_closing_report(tmp_path / "bad", {"retrieval": "not a dict"}) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[report] ") and "not written" in out[0]
    assert not (tmp_path / "bad" / "report.md").exists()


def test_the_cli_prints_the_report_instead_of_the_json_summary(store, tmp_path, capsys):
    from cli.main import print_closing_report

    grpo = grpo_results(store, grpo_noise=0.3, warm_noise=3.0, init_from=False)
    write_closing_report(tmp_path, grpo)
    assert print_closing_report(grpo, tmp_path)
    out = capsys.readouterr().out
    assert "Verdict:" in out and f"report: {tmp_path / 'report.md'}" in out
    assert "report.md also has: Examples" in out and "Examples:" not in out  # the terminal gets the verdict and the retrieval table
    assert "Examples" in (tmp_path / "report.md").read_text()
    assert not print_closing_report({"kind": "describe", "summary": {"x": 1}}, tmp_path)


def test_the_viewer_step_prints_one_line_when_it_cannot_write(tmp_path, capsys):
    from types import SimpleNamespace

    from recipes.warmup_then_grpo import viewer_passage, write_closing_viewer

    capsys.readouterr()
    doc_id, text = viewer_passage({"retrieval": {"items": [{"doc_id": "embedded:3"}]}})
    assert doc_id == "embedded:3" and text
    assert viewer_passage({})[0] == "embedded:0"
    cfg = SimpleNamespace(model=SimpleNamespace(name="tiny-random-llama"))
    assert write_closing_viewer(cfg, tmp_path, {}, max_model_bytes=1) is None  # too large: the command to run instead
    assert write_closing_viewer(cfg, tmp_path, {}) is None  # no checkpoint under tmp_path/grpo
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("[viewer] not written") for line in lines)
    assert f"cycle-oracle describe --checkpoint {tmp_path / 'grpo'}" in lines[0]
    assert not (tmp_path / "viewer.html").exists()


def test_warmup_then_grpo_ends_with_the_report(store, tmp_path, monkeypatch, capsys):
    """The driver's closing steps with the stages stubbed: report.md from both stages' results (the
    warmup's read back from its results.json when it is reused), the viewer's failure one line."""
    from cycle_oracle.config import RecipeConfig
    from recipes import grpo, warmup, warmup_then_grpo

    grpo_res, warm_res = grpo_results(store, grpo_noise=0.3, warm_noise=3.0), warmup_results(reads=True)
    calls = []

    def fake_warmup(cfg, out, resume=False, on_step_time=None, on_stage=None):
        calls.append(("warmup", out))
        for step in range(1, cfg.warmup.steps + 1):
            on_step_time(step, 4.3)
        on_stage("warmup/sft_steps", steps=cfg.warmup.steps, examples=8 * cfg.warmup.steps)
        (out / "activations").mkdir(parents=True, exist_ok=True)  # the store GRPO reads too
        (out / "activations" / "meta.json").write_text("{}")
        return warm_res

    def fake_grpo(cfg, out, resume=False, on_step_end=None, on_stage=None):
        calls.append(("grpo", cfg.init_from))
        assert (out / "activations" / "meta.json").is_file(), "GRPO starts with the warmup's activations, not a second extraction"
        for step in range(1, cfg.grpo.steps + 1):
            on_step_end(None, step)
        on_stage("grpo/steps", steps=cfg.grpo.steps, samples=16 * cfg.grpo.steps)
        return grpo_res

    monkeypatch.setattr(warmup, "run", fake_warmup)
    monkeypatch.setattr(grpo, "run", fake_grpo)
    cfg = RecipeConfig(kind="warmup_then_grpo", model={"name": "tiny-random-llama", "layer": 1})
    capsys.readouterr()
    out = warmup_then_grpo.run(cfg, tmp_path)
    assert calls == [("warmup", tmp_path / "warmup"), ("grpo", str(tmp_path / "warmup"))]
    assert out["grpo"] is grpo_res and out["warmup"] is warm_res and out["viewer"] is None  # no checkpoint under grpo/
    lines = capsys.readouterr().out.strip().splitlines()
    job = [line for line in lines if line.startswith("[job]")]  # the plan, the ETA after 5 warmup steps, one line per stage, the end
    assert len(job) == 5 and job[1].startswith("[job] ETA: about ") and "from the first 5 warmup steps at 4.3 s each" in job[1], job
    assert job[2].startswith("[job] warmup done at ") and job[2].endswith(" min left)"), job
    assert job[3].endswith("the viewer and the report next (about 0.5 min left)"), job
    assert job[4].startswith("[job] done in ") and str(tmp_path / "minutes.json") in job[4], job
    minutes = json.loads((tmp_path / "minutes.json").read_text())  # the stages the recipes reported, then the driver's own
    laps = [s for s in minutes["stages"] if not s["stage"].startswith("setup/")]
    assert [s["stage"] for s in laps] == ["warmup/sft_steps", "grpo/steps", "viewer", "report"]
    assert all(b["start_s"] == pytest.approx(a["start_s"] + a["seconds"], abs=0.02) for a, b in zip(laps, laps[1:]))  # contiguous
    assert laps[-1]["start_s"] + laps[-1]["seconds"] <= minutes["wall_s"] + 0.02
    assert minutes["warmup"]["step_seconds"] == [4.3] * cfg.warmup.steps and minutes["matmul_reference"]["float32"] > 0
    printed = [line for line in lines if not line.startswith("[job]")]
    assert len(printed) == 1 and printed[0].startswith("[viewer] not written")
    assert (tmp_path / "report.md").read_text() == closing_report(grpo_res, warm_res).markdown
    assert report_from_results(out).markdown == closing_report(grpo_res, warm_res).markdown

    (tmp_path / "warmup").mkdir(exist_ok=True)  # a finished warmup is reused: its results come from results.json
    (tmp_path / "warmup" / "results.json").write_text(json.dumps(warm_res))
    calls.clear()
    capsys.readouterr()
    again = warmup_then_grpo.run(cfg, tmp_path)
    assert [c[0] for c in calls] == ["grpo"] and again["warmup"] == warm_res
    job = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[job]")]
    assert len(job) == 4 and job[1].endswith("; GRPO next"), job  # no warmup step measured: no ETA yet
    assert again["summary"]["warmup"] == "reused from a previous run"
    assert "## Warmup, held-out" in (tmp_path / "report.md").read_text()


def test_a_gain_only_under_the_co_trained_encoder_is_flagged():
    from recipes.report import gain_only_under_own_encoder

    up = {"centred_cosine": {"mean": 0.1, "ci_low": 0.05, "ci_high": 0.15}}
    flat = {"centred_cosine": {"mean": 0.01, "ci_low": -0.02, "ci_high": 0.04}}
    assert gain_only_under_own_encoder({"grpo_minus_warmup": up, "frozen_start_encoder": {"grpo_minus_warmup": flat},
                                        "text_encoder": {"grpo_minus_warmup": flat}})
    assert not gain_only_under_own_encoder({"grpo_minus_warmup": up, "frozen_start_encoder": {"grpo_minus_warmup": flat},
                                            "text_encoder": {"grpo_minus_warmup": up}})
    assert not gain_only_under_own_encoder({"grpo_minus_warmup": up})  # nothing independent to compare with: no flag
    assert not gain_only_under_own_encoder({"grpo_minus_warmup": flat, "text_encoder": {"grpo_minus_warmup": flat}})
