"""Issue 30's CI checks on real Ray (one local cluster for both runs): the smoke organism recipe
(two Taboo organisms trained by TRL in a Ray task, read at held-out prompts, every oracle asked for
the word) together with every new control on the smoke checkpoint (the text-only guess, the
decoder minus the guess, truncation, the quote ban, a second grader); then the default eval recipe
(`recipes/eval_cpu.yaml`, sizes cut down) on a machine without the data folder and without the hub."""

import json
from pathlib import Path

import pytest
import ray
import torch
from fake_checkpoints import warmup_like_checkpoint

from cycle_oracle.config import load_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_smoke_organisms_every_new_control_and_the_default_eval_without_the_data_folder(tmp_path, monkeypatch):
    from cli.main import main as cli_main
    from cycle_oracle.corpus import hub_reachable
    from cycle_oracle.data.eval_tasks import SOURCE
    from cycle_oracle.evals.baselines import ORACLES
    from cycle_oracle.models import resolve_model_path
    from cycle_oracle.organism import load_organism
    from recipes import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a fresh machine with only PyPI: no hub
    hub_reachable.cache_clear()
    checkpoint = tmp_path / "warm"
    warmup_like_checkpoint(checkpoint, load_recipe(REPO / "recipes" / "secrets_smoke.yaml"))
    cfg = load_recipe(REPO / "recipes" / "secrets_smoke.yaml", [f"init_from={checkpoint}", f"eval.grader={checkpoint}"])
    out, fresh = tmp_path / "secrets", tmp_path / "fresh"
    try:
        res = evaluate.run(cfg, out)
        # the default eval recipe as a new user runs it, from a folder without ../shared/data, the data folder hidden
        (fresh / "work").mkdir(parents=True)
        (fresh / "empty").mkdir()
        monkeypatch.setenv("CYCLE_ORACLE_DATA_DIR", str(fresh / "empty"))
        monkeypatch.chdir(fresh / "work")
        rc = cli_main(["eval", str(REPO / "recipes" / "eval_cpu.yaml"), "--out", str(fresh / "eval"),
                       "--set", "model.name=tiny-random-llama", "--set", "model.layer=1", "--set", "resources.learner.num_cpus=1",
                       "--set", "eval.pool_size=6", "--set", "eval.probe_items_per_task=10", "--set", "eval.probe_positions=[last]",
                       "--set", "eval.arithmetic_per_digits=2", "--set", "eval.paraphrase=false", "--set", "sampling.max_new_tokens=4",
                       "--set", "eval.truncation_tokens=[2]"])
    finally:
        ray.shutdown()
        hub_reachable.cache_clear()

    # -- the organisms: PEFT folders of the target that differ from it, with their training reports
    words = cfg.eval.secrets.words
    for w in words:
        folder = out / "organisms" / w
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        report = json.loads((folder / "organism.json").read_text())
        assert report["model"] == "tiny-random-llama" and report["steps"] >= 2 and report["dialogues"] == cfg.eval.secrets.dialogues_per_word
        organism = load_organism(resolve_model_path("tiny-random-llama"), folder)
        assert any(p.abs().sum() > 0 for n, p in organism.named_parameters() if "lora_B" in n), "the organism's LoRA was trained"

    # -- secrets: every oracle asked on the same items, the organism-side controls, paired with the guess
    saved = json.loads((out / "results.json").read_text())
    assert saved["oracles"] == list(ORACLES)
    controls = saved["secret_controls"]
    items = len(words) * cfg.eval.secrets.prompts_per_word
    assert controls["items"] == items and controls["words"] == sorted(words)
    assert controls["black_box"]["n"] == 3 * len(words) and controls["leak_rate"]["n"] == items
    sections = {"decoder": saved, **saved["other_oracles"]}
    for name, sec in sections.items():
        routes = sec["secrets"]["routes"]
        assert set(routes) == ({"answer", "description"} if name in ("decoder", "selfie") else {"description"}), name
        for blk in routes.values():
            assert blk["n"] == items and blk["ci_low"] <= blk["accuracy"] <= blk["ci_high"]
            assert set(blk["per_word"]) == set(words)
    assert set(saved["versus_text_guess"]) == set(ORACLES) - {"text_guess"}
    vs = saved["versus_text_guess"]["decoder"]
    assert set(vs["retrieval"]) == {"own", "grader"} and "secrets" in vs
    # -- retrieval controls: truncation curve, quote ban, the grader (the same checkpoint: the same numbers)
    r = saved["retrieval"]
    assert r["truncation"]["tokens"] == [2, 4, "all"] and "quote_banned" in r["conditions"]
    assert r["truncation"]["curve"][-1]["top1"] == r["conditions"]["description"]["top1"]
    graded = r["graders"]["grader"]["conditions"]
    for cond in ("description", "shuffled", "truncated_2", "quote_banned"):
        assert graded[cond]["fve"] == pytest.approx(r["conditions"][cond]["fve"], abs=1e-5), cond
    guess = sections["text_guess"]["retrieval"]
    assert guess["rows"] == r["rows"] and "zero" not in guess["conditions"], "the guess reads text: no zero-activation control"
    md = (out / "report.md").read_text()
    for heading in ("## Secret elicitation", "## Minus the text-only guess", "What survives truncation", "graded by another checkpoint",
                    "predict the mean"):
        assert heading in md, heading
    assert (out / "truncation.png").is_file()
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("secrets/leak_rate" in row and "retrieval/minus_text_guess_centred_cosine" in row for row in logged)

    # -- the default eval without the data folder: the generated tasks, the embedded corpus
    assert rc == 0
    default = json.loads((fresh / "eval" / "results.json").read_text())
    assert set(default["evals"]) == {"retrieval", "probes", "arithmetic"}
    assert {t["source"] for t in default["probes"]["tasks"].values()} == {SOURCE} and len(default["probes"]["tasks"]) == 6
    assert all(it["doc_id"].startswith("embedded:") for it in default["retrieval"]["items"])
    assert torch.isfinite(torch.tensor(default["retrieval"]["conditions"]["description"]["fve"]))
