"""Throughput benchmarks: rollout, encoder, learner and the end-to-end GRPO step, against the
machine's measured matmul limit (docs/BENCHMARKS.md explains every number and convention).

    cycle-oracle bench --out bench.json --md bench.md                  # everything (~35 min on 2 cores)
    cycle-oracle bench --sections machine,rollout,hf,encoder,learner,paper --out micro.json   # ~13 min
    cycle-oracle bench --quick --out /tmp/q.json                       # tiny random model, seconds-scale
    python -m bench --sections paper --out /tmp/p.json                 # the same program, from the repo root

Each measurement runs in its own subprocess (`--_case`), so engine settings read from the
environment at start (vLLM thread binding, prefix caching, LoRA) and thread counts never leak from
one case into the next; every record carries the machine load seen while it ran (load average and
the CPU time other processes used during the measurement window).

Sections:
  machine  dense matmul FLOP/s (fp32, bf16) + decode-shaped GEMMs: the MFU reference
  rollout  vLLM RolloutEngine: B x K sweep (equal lengths via min_tokens) + engine-setting cases
  hf       HF `generate` on the same prompts/lengths/batches (the ratio baseline)
  encoder  ActivationEncoder scoring (forward) and co-training update (forward + backward + AdamW)
  learner  DecoderLearner.update_shard (old + reference log-probs, policy forward + backward + step)
  e2e      recipes/cycle_grpo.yaml for 4 steps, plain and with overlap_rollout: time split + peak RSS
  scaling  the same with 2 rollout actors (samples/s; on 2 cores this measures contention)
  paper    FLOPs per role and step time of a Qwen3-8B GPU-cluster step (no measurement)
"""
