"""The command line for people: our own errors are one message naming the value, what was expected
and how to fix it, with no traceback (`--debug` shows one); `--dry-run` checks what it can."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["describe", "--checkpoint", "/nope", "--text", "hi", "--html", "/tmp/x.html"], "no checkpoint at /nope: the folder does not exist"),
    (["run", "recipes/smoke_grpo.yaml", "--dry-run", "--set", "model.layer=99"], "model.layer=99 does not fit tiny-random-llama"),
    (["run", "recipes/smoke_grpo.yaml", "--dry-run", "--set", "model.name=/no/such/model"], "model.name='/no/such/model' is neither a local model folder"),
    (["run", "recipes/smoke_grpo.yaml", "--dry-run", "--set", "grpo.steps=two"], "grpo.steps"),
    (["run", "recipes/nope.yaml", "--dry-run"], "recipe file not found: recipes/nope.yaml"),
    (["eval", "recipes/eval_smoke.yaml", "--checkpoint", "/nope"], "no checkpoint at /nope"),
])
def test_user_errors_are_one_message_without_a_traceback(args, message):
    res = _cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: grpo\n  grpo: [\n")
    res = _cli("run", str(bad), "--dry-run")
    assert res.returncode == 2 and "is not valid YAML at line 2" in res.stderr and "Traceback" not in res.stderr


def test_debug_shows_the_traceback():
    res = _cli("--debug", "run", "recipes/smoke_grpo.yaml", "--dry-run", "--set", "model.layer=99")
    assert res.returncode != 0 and "Traceback" in res.stderr and "LayerError" in res.stderr


def test_dry_run_checks_model_and_layer():
    res = _cli("run", "recipes/smoke_grpo.yaml", "--dry-run")
    assert res.returncode == 0 and "(2 blocks): read layer 1" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_a_run_is_quiet_and_its_roles_log_to_the_run_folder(tmp_path):
    """Library warnings (vLLM, Ray, DeepSpeed, transformers) go to <run>/logs/, not the terminal."""
    out = tmp_path / "describe"
    res = _cli("run", "recipes/smoke_describe.yaml", "--out", str(out), "--set", "ray.num_cpus=2")
    printed = (res.stdout + res.stderr).splitlines()
    assert res.returncode == 0, "\n".join(printed[-40:])
    assert len(printed) < 40, "\n".join(printed)
    assert not [line for line in printed if "WARNING" in line and "Token authentication" not in line], "\n".join(printed)
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    assert {"rollout-0.log", "extraction.log"} <= set(logs), sorted(logs)
    assert "vllm" in logs["rollout-0.log"].lower()


def test_config_prints_a_sections_keys_with_defaults_and_help():
    """`cycle-oracle config grpo`: every key of the section with its type, default and description
    (the schema's own docstrings); a nested section by its dotted path; an unknown one is named."""
    from cycle_oracle.config import GrpoSettings

    out = _cli("config", "grpo")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("grpo (GrpoSettings): ")
    for name, field in GrpoSettings.model_fields.items():
        assert f"  {name}: " in out.stdout, name
    assert "  kl_coef: float = 0.01\n      Weight of the KL" in out.stdout
    assert "(its keys: cycle-oracle config grpo.decoder_optim)" in out.stdout
    nested = _cli("config", "encoder.optim")
    assert nested.returncode == 0 and "  lr: float = 0.0003" in nested.stdout
    bad = _cli("config", "grpo.steps")
    assert bad.returncode == 2 and "'steps' is not a section of grpo; expected one of decoder_optim" in bad.stderr
