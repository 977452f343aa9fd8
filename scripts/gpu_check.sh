#!/usr/bin/env bash
# GPU check: on one CUDA machine that already has a CUDA build of torch (and usually transformers
# and peft), install only the missing pure-Python pieces, run the gpu-marked tests, then the memory
# probe (bench/gpu_memory.py: one GRPO step on a random Qwen3-8B-shaped decoder), and write one JSON:
#
#   bash scripts/gpu_check.sh [OUT.json]       # default: $OUT/gpu_check.json
#
# It never installs, upgrades or removes torch, and it does not install the project: the repo root
# goes on PYTHONPATH. Packages go into the running interpreter's environment ($PYTHON, default python3).
# Without network, give a folder of wheels / sdists: GPU_CHECK_WHEELS=dir (pip --no-index
# --find-links dir --no-deps: the folder must hold every missing package, dependencies included).
# With network and no folder, pip installs the missing ones from PyPI (torch pinned to the installed one).
#
# What the tests and the probe need besides torch (import name -> package):
#   deepspeed (sdist only on PyPI; installs without compiling: DS_BUILD_OPS=0), hjson, pydantic,
#   pydantic-core (compiled: a cp3XX manylinux wheel), annotated-types, typing-inspection, trl,
#   datasets (trl.trainer.utils imports it), dill, multiprocess, plus, usually present on GPU images,
#   transformers, peft, safetensors, pyyaml, rich, tokenizers, accelerate, msgpack, ninja, psutil,
#   py-cpuinfo, einops, pyarrow, pandas, xxhash, fsspec, huggingface-hub, pytest, pytest-timeout.
#   Together the usually-missing ones are ~7 MB. ray, vllm (GPU build, hundreds of MB) and wandb are
#   not needed: tests that need them skip.
# Bring them from a machine with PyPI (Python version and platform of the GPU machine):
#   bash scripts/gpu_check.sh --download wheels/        # PY_VERSION=3.12 (default), versions of this venv
# e.g. for the workplace's device machine: `echo /.whl/ >> .git/info/exclude`,
#   bash scripts/gpu_check.sh --download .whl, then run there with carry [".whl"]:
#   GPU_CHECK_WHEELS=.whl bash scripts/gpu_check.sh
# Other knobs: GPU_CHECK_PROBE_ARGS (extra probe arguments, e.g. "--set memory.gradient_checkpointing=true";
# "--tiny --device cpu" checks this script on a CPU machine), GPU_CHECK_PROBE_TIMEOUT (s, default 900).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
say() { echo "[gpu_check] $*" >&2; }

# The packages most GPU images lack (pip names; the --download list and the usual install).
usually_missing=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection trl datasets dill multiprocess)

if [ "${1:-}" = "--download" ]; then
  dest="${2:?usage: gpu_check.sh --download DIR}"
  mkdir -p "$dest"
  pins=$("$py" - "${usually_missing[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
EOF
)
  binary=$(echo "$pins" | grep -v '^deepspeed')
  ds=$(echo "$pins" | grep '^deepspeed')
  say "downloading for Python ${PY_VERSION:-3.12} x86-64: ${pins//$'\n'/ }"
  # shellcheck disable=SC2086
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" $binary
  "$py" -m pip download -q --no-deps --no-binary=:all: -d "$dest" "$ds"
  du -sh "$dest" >&2
  exit 0
fi

out="${1:-${OUT:+$OUT/gpu_check.json}}"
[ -n "$out" ] || { say "give the output path as \$1 or set OUT"; exit 2; }
mkdir -p "$(dirname "$out")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

torch_version=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null) \
  || { say "$py has no torch: install a CUDA build of torch first (this script never installs torch)"; exit 1; }
say "python $("$py" -c 'import platform; print(platform.python_version())'), torch $torch_version, CUDA available: $("$py" -c 'import torch; print(torch.cuda.is_available())')"

# import name:package; find_spec only (importing deepspeed or trl takes seconds each)
missing=$("$py" - <<'EOF'
import importlib.util
needs = {"deepspeed": "deepspeed", "hjson": "hjson", "pydantic": "pydantic", "pydantic_core": "pydantic-core",
         "annotated_types": "annotated-types", "typing_inspection": "typing-inspection", "trl": "trl", "datasets": "datasets",
         "dill": "dill", "multiprocess": "multiprocess", "transformers": "transformers", "peft": "peft",
         "safetensors": "safetensors", "yaml": "pyyaml", "rich": "rich", "tokenizers": "tokenizers", "accelerate": "accelerate",
         "msgpack": "msgpack", "ninja": "ninja", "psutil": "psutil", "cpuinfo": "py-cpuinfo", "einops": "einops",
         "pyarrow": "pyarrow", "pandas": "pandas", "xxhash": "xxhash", "fsspec": "fsspec", "huggingface_hub": "huggingface-hub",
         "pytest": "pytest", "pytest_timeout": "pytest-timeout"}
print(" ".join(pkg for mod, pkg in needs.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  say "installing: $missing"
  echo "torch==$torch_version" > "$work/constraints.txt"
  pip=("$py" -m pip install -q --disable-pip-version-check -c "$work/constraints.txt")
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    [ -d "$GPU_CHECK_WHEELS" ] || { say "GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS is not a folder"; exit 1; }
    pip+=(--no-index --find-links "$GPU_CHECK_WHEELS" --no-deps --no-build-isolation)
  fi
  # shellcheck disable=SC2086
  DS_BUILD_OPS=0 "${pip[@]}" $missing || { say "pip could not install: $missing (offline? bring them with --download, see the header)"; exit 1; }
else
  say "every package is already there"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$py" -c "import deepspeed, pydantic, yaml, peft, transformers, trl.trainer.utils, cycle_oracle.learner" 2>"$work/import.log" \
  || { tail -n 20 "$work/import.log" >&2; say "the installed packages do not import (see above)"; exit 1; }

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

"$py" - "$work" "$out" "$test_rc" "$probe_rc" "$gpu" <<'EOF'
import json, platform, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, test_rc, probe_rc, gpu = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
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
record = {"nvidia_smi": gpu or None, "python": platform.python_version(), "pytest": tests, "probe": probe}
out.write_text(json.dumps(record, indent=2) + "\n")
print(f"[gpu_check] wrote {out}: tests exit {test_rc} ({tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
      f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped); probe {probe.get('status')} (exit {probe_rc})",
      file=sys.stderr)
EOF
[ "$test_rc" = 0 ] && [ "$probe_rc" = 0 ]
