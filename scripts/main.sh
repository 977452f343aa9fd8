#!/usr/bin/env bash
# The main job on the embedded default (local Ray, SmolLM2-135M-Instruct, CPU budget):
# set up the venv if needed, then run the recipe. Extra arguments go to `cycle-oracle run`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CYCLE_ORACLE_SETUP_START="${CYCLE_ORACLE_SETUP_START:-$(date +%s.%N)}"  # the job's minutes account starts here (recipes/eta.py)
bash scripts/setup.sh
recipe="${CYCLE_ORACLE_RECIPE:-recipes/warmup_then_grpo.yaml}"
exec "$root/.venv/bin/cycle-oracle" run "$recipe" --out "${CYCLE_ORACLE_OUT:-runs/main}" "$@"
