#!/usr/bin/env bash
# Every run behind EXERCISES.md's measured answers, in the order they were made (seed 0 first).
# Run from the repository root: bash results/lab/commands.sh   (~3-4 minutes per run on 2 idle cores)
set -euo pipefail
COMMON=(--size tiny --data ../shared/minipile/00.jsonl.zst ../shared/minipile/01.jsonl.zst
        --val-data ../shared/minipile/val.jsonl.zst --steps 100 --batch-size 8 --seq-len 64
        --eval-every 25 --eval-tokens 8192 --log-every 10)
for seed in 0 1; do
  run() { name=$1; shift; [ -f "results/lab/$name-s$seed/log.jsonl" ] && [ -f "results/lab/$name-s$seed/ckpt.npz" ] && return
          python train.py "${COMMON[@]}" --seed "$seed" --out "results/lab/$name-s$seed" "$@"; }
  run leviathan        --model leviathan                       # (b-f) the paper's model
  run dense            --model dense                           # (b) its dense twin
  run dense-std0.21    --model dense --set embed_init_std=0.21 # (b) dense table at Leviathan's initial RMS
  run leviathan-rms    --model leviathan --set embed_norm=rms  # (b) RMSNorm on the embeddings
  run dense-rms        --model dense --set embed_norm=rms      # (b) the same for dense
  run leviathan-sum    --model leviathan --set gen_combine=sum # (c) modes: mean of factors, not product
  run leviathan-perm   --model leviathan --set id_permutation_seed=1  # (d) ids shuffled before decomposition
  run leviathan-knots8 --model leviathan --set gen_knots=8     # (e) 8 knots instead of 32
  run leviathan-rank16 --model leviathan --set gen_rank=16     # (e) rank 16 instead of 64
done
