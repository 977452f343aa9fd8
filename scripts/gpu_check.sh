#!/usr/bin/env bash
# GPU check: on one CUDA machine that already has a CUDA build of torch (and usually transformers
# and peft), install only the missing pure-Python pieces, run the gpu-marked tests, then the memory
# probe (bench/gpu_memory.py: one GRPO step on a random Qwen3-8B-shaped decoder), and write one JSON:
#
#   bash scripts/gpu_check.sh [OUT.json]       # default: $OUT/gpu_check.json
#   bash scripts/gpu_check.sh --install-only   # install what is missing, pip check, import check; no tests
#
# It never installs, upgrades or removes torch (the installed one is a pip constraint), and it does
# not install the project: the repo root goes on PYTHONPATH. Packages go into $PYTHON's environment
# (default: the project's .venv where it exists, else python3).
# What the check needs besides torch, transformers and peft: scripts/gpu_packages.py NEEDS (DeepSpeed,
# TRL, pydantic, datasets, pyyaml, rich, safetensors, pytest, pytest-timeout) and what they require.
# Without network, give a folder of wheels / sdists: GPU_CHECK_WHEELS=dir (pip --no-index
# --find-links dir: the folder must hold every missing package, dependencies included; `pip check`
# then says whether it did). With network and no folder, pip installs the missing ones from PyPI.
# Bring them from a machine with PyPI and the dev venv (its versions; Python version and platform of
# the GPU machine):
#   bash scripts/gpu_check.sh --download wheels/        # PY_VERSION=3.12 (default); prints the folder's size
# It fetches every distribution NEEDS pull in that torch, transformers and peft do not (plus
# setuptools and wheel: DeepSpeed is an sdist, built there without build isolation, DS_BUILD_OPS=0):
# about 70 MB, 55 of them pyarrow (datasets >= 5 requires pyarrow >= 24, TRL requires datasets).
# CI runs this offline path on the CPU (tests/test_gpu_preflight.py: --download, then --install-only
# in a scratch venv that sees only torch, transformers and peft).
# e.g. for the workplace's device machine: `echo /.whl/ >> .git/info/exclude`,
#   bash scripts/gpu_check.sh --download .whl, then run there with carry [".whl"]:
#   GPU_CHECK_WHEELS=.whl bash scripts/gpu_check.sh
# Other knobs: GPU_CHECK_PROBE_ARGS (extra probe arguments, e.g. "--set memory.gradient_checkpointing=true";
# "--tiny --device cpu" checks this script on a CPU machine), GPU_CHECK_PROBE_TIMEOUT (s, default 900).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${PYTHON:-}" ] && [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="${PYTHON:-python3}"; fi
say() { echo "[gpu_check] $*" >&2; }
DOWNLOAD_BUDGET_MB=60

if [ "${1:-}" = "--download" ]; then
  dest="${2:?usage: gpu_check.sh --download DIR}"
  mkdir -p "$dest"
  pins=$("$py" scripts/gpu_packages.py download-pins --python-version "${PY_VERSION:-3.12}")
  binary=$(echo "$pins" | grep -v '^deepspeed==')
  ds=$(echo "$pins" | grep '^deepspeed==')
  say "downloading for Python ${PY_VERSION:-3.12} x86-64 (the versions of $py): ${pins//$'\n'/ }"
  # shellcheck disable=SC2086
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" $binary
  "$py" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$dest" "$ds"
  mb=$(du -sm "$dest" | cut -f1)
  say "$dest: ${mb} MB in $(find "$dest" -maxdepth 1 -type f | wc -l) files; largest: $(ls -S "$dest" | head -n 3 | tr '\n' ' ')"
  if [ "$mb" -gt "$DOWNLOAD_BUDGET_MB" ]; then
    say "over the ${DOWNLOAD_BUDGET_MB} MB budget: pyarrow alone is ~55 MB (datasets >= 5 needs pyarrow >= 24, and TRL needs datasets)"
  fi
  exit 0
fi
install_only=0
if [ "${1:-}" = "--install-only" ]; then install_only=1; shift; fi

if [ "$install_only" = 0 ]; then
  out="${1:-${OUT:+$OUT/gpu_check.json}}"
  [ -n "$out" ] || { say "give the output path as \$1 or set OUT"; exit 2; }
  mkdir -p "$(dirname "$out")"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

torch_version=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null) \
  || { say "$py has no torch: install a CUDA build of torch first (this script never installs torch)"; exit 1; }
say "python $py ($("$py" -c 'import platform; print(platform.python_version())')), torch $torch_version, CUDA available: $("$py" -c 'import torch; print(torch.cuda.is_available())')"

# the NEEDS distributions not installed (metadata only: importing deepspeed or trl takes seconds each)
# shellcheck disable=SC2046
missing=$("$py" - $("$py" scripts/gpu_packages.py needs) <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution
missing = []
for name in sys.argv[1:]:
    try:
        distribution(name)
    except PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
EOF
)
pip=("$py" -m pip --disable-pip-version-check)
if [ -n "$missing" ]; then
  say "installing: $missing (and what they require)"
  echo "torch==$torch_version" > "$work/constraints.txt"
  install=("${pip[@]}" install -q -c "$work/constraints.txt")
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    [ -d "$GPU_CHECK_WHEELS" ] || { say "GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS is not a folder"; exit 1; }
    install+=(--no-index --find-links "$GPU_CHECK_WHEELS")
  fi
  # DeepSpeed's sdist builds against the installed torch (no build isolation), so setuptools and wheel first
  "$py" -c "import setuptools, wheel" 2>/dev/null || "${install[@]}" setuptools wheel \
    || { say "pip could not install setuptools and wheel (offline? bring them with --download, see the header)"; exit 1; }
  # shellcheck disable=SC2086
  DS_BUILD_OPS=0 "${install[@]}" --no-build-isolation $missing \
    || { say "pip could not install: $missing (offline? bring them with --download, see the header)"; exit 1; }
else
  say "every package is already there"
fi
pip_check_rc=0
"${pip[@]}" check >"$work/pip_check.log" 2>&1 || pip_check_rc=$?
if [ "$pip_check_rc" != 0 ]; then
  cat "$work/pip_check.log" >&2
  say "pip check found broken requirements (above)"
  [ "$install_only" = 0 ] || exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$py" -c "import deepspeed, pydantic, yaml, peft, transformers, trl.trainer.utils, cycle_oracle.learner" 2>"$work/import.log" \
  || { tail -n 20 "$work/import.log" >&2; say "the installed packages do not import (see above)"; exit 1; }
if [ "$install_only" = 1 ]; then
  say "installed: pip check clean, the check's imports work"
  exit 0
fi

# the gpu-marked tests (only the files that have any: other test files import ray / vllm at the top)
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
say "pytest -m gpu ${files[*]}"
set +e
"$py" -m pytest -p no:cacheprovider -q -rs -m gpu --junitxml="$work/junit.xml" "${files[@]}" 2>&1 | tee "$work/pytest.log" >&2
test_rc=${PIPESTATUS[0]}
say "memory probe: python -m bench.gpu_memory ${GPU_CHECK_PROBE_ARGS:-}"
# shellcheck disable=SC2086
timeout "${GPU_CHECK_PROBE_TIMEOUT:-900}" "$py" -m bench.gpu_memory --out "$work/probe.json" ${GPU_CHECK_PROBE_ARGS:-} \
  >"$work/probe.log" 2>&1
probe_rc=$?
set -e
tail -n 30 "$work/probe.log" >&2
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "")

"$py" - "$work" "$out" "$test_rc" "$probe_rc" "$gpu" "$pip_check_rc" <<'EOF'
import json, platform, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, test_rc, probe_rc, gpu = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pip_check = {"exit_code": int(sys.argv[6]), "output": (work / "pip_check.log").read_text(errors="replace")[-3000:]}
tests = {"exit_code": test_rc}
try:
    root = ET.parse(work / "junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"seconds": float(suite.get("time", 0))})
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        detail = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "detail": detail[:500]})
    tests["cases"] = cases
    tests["passed"] = sum(c["outcome"] == "passed" for c in cases)
except (OSError, ET.ParseError) as err:
    tests["error"] = f"no junit report: {err}"
    tests["log_tail"] = (work / "pytest.log").read_text(errors="replace")[-3000:] if (work / "pytest.log").exists() else ""
try:
    probe = json.loads((work / "probe.json").read_text())
except (OSError, ValueError):
    probe = {"status": "failed", "log_tail": (work / "probe.log").read_text(errors="replace")[-3000:]}
probe["exit_code"] = probe_rc
record = {"nvidia_smi": gpu or None, "python": platform.python_version(), "pip_check": pip_check, "pytest": tests, "probe": probe}
out.write_text(json.dumps(record, indent=2) + "\n")
print(f"[gpu_check] wrote {out}: tests exit {test_rc} ({tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
      f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped); probe {probe.get('status')} (exit {probe_rc})",
      file=sys.stderr)
EOF
[ "$test_rc" = 0 ] && [ "$probe_rc" = 0 ]
