#!/usr/bin/env bash
# The beyond-transcription experiment (issue 20, item 6), one arm after another on a 2-core CPU.
# Every quoted arm starts from ONE warmup checkpoint (WARMUP: a finished main job's <out>/warmup),
# linked into the arm's folder so `kind: warmup_then_grpo` reuses it; the quote-free arm trains its
# own warmup (description_quote_tokens 0). Then `cycle-oracle eval` on each arm (retrieval with
# the paraphrase test, the context-copy control, six probe tasks) and once on the warmup checkpoint
# with every training-free baseline (graded by the warmup's encoder: the frozen one).
#   bash experiments/beyond_transcription/run_arms.sh WARMUP OUT [ARM...]
set -euo pipefail
warmup="$(realpath "$1")"; out="$2"; shift 2
arms=("${@:-baseline copy_penalty sft_mix quote_free evals}")
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
co="${CYCLE_ORACLE:-.venv/bin/cycle-oracle}"
recipe=recipes/warmup_then_grpo.yaml
# GRPO budget of every arm: 24 steps, KL to the warmup decoder (the long recipe's choice), 2 lr warmup steps
common=(--set grpo.steps=24 --set grpo.kl_reference=warmup --set grpo.decoder_optim.warmup_steps=2 --set logging.wandb_mode=disabled)
declare -A extra=(
  [baseline]=""
  [copy_penalty]="--set grpo.copy_penalty=0.5"
  [sft_mix]="--set grpo.sft_mix_weight=0.5"
  [quote_free]="--set warmup.description_quote_tokens=0"
)
mkdir -p "$out"
for arm in ${arms[@]}; do
  [[ $arm == evals ]] && continue
  dir="$out/$arm"; mkdir -p "$dir"
  [[ $arm != quote_free && ! -e $dir/warmup ]] && ln -s "$warmup" "$dir/warmup"
  echo "[exp] $arm start $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086
  "$co" run "$recipe" --out "$dir" "${common[@]}" ${extra[$arm]} > "$dir.log" 2>&1
  echo "[exp] $arm done $(date -u +%H:%M:%S)"
done
if [[ " ${arms[*]} " == *" evals "* ]]; then
  for arm in baseline copy_penalty sft_mix quote_free; do
    [[ -d $out/$arm/grpo ]] || continue
    echo "[exp] eval $arm start $(date -u +%H:%M:%S)"
    "$co" eval "$here/eval_embedded.yaml" --checkpoint "$out/$arm/grpo" --out "$out/eval_$arm" > "$out/eval_$arm.log" 2>&1 || echo "[exp] eval $arm failed"
  done
  echo "[exp] baselines start $(date -u +%H:%M:%S)"
  "$co" eval "$here/eval_embedded.yaml" --checkpoint "$warmup" --oracle decoder,selfie,patchscopes,logit_lens,latentlens \
      --out "$out/eval_baselines" > "$out/eval_baselines.log" 2>&1 || echo "[exp] baselines failed"
  echo "[exp] evals done $(date -u +%H:%M:%S)"
fi
