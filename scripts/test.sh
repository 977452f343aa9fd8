#!/usr/bin/env bash
# The test command (README, CI): set up the venv if needed, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k grpo`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# Headless Chromium for the viewer test (Debian's package; skipped where apt is unavailable).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[test] installing Debian's chromium for the viewer test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "[test] chromium not installed; the viewer test will skip"
fi
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=1
set +e
"$root/.venv/bin/python" -m pytest -p no:cacheprovider -q -rs "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "no tests were collected" >&2
  exit 1
fi
exit "$rc"
