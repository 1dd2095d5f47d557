#!/usr/bin/env bash
# Every run behind EXERCISES.md's measured answers, in the order they were made.
# Run from the repository root (3-13 minutes per run on 2 cores):
#   bash results/lab/commands.sh                  # writes runs/lab/<run>; compare with results/lab/<run>
#   bash results/lab/commands.sh --redo-results   # replaces the committed runs in results/lab on purpose
# A run already in the folder is resumed from its checkpoint (a finished one does nothing).
set -euo pipefail
OUT=runs/lab
if [ "${1:-}" = "--redo-results" ]; then OUT=results/lab; fi
COMMON=(--size tiny --data corpus/minipile/00.jsonl.zst corpus/minipile/01.jsonl.zst
        --val-data corpus/minipile/val.jsonl.zst --steps 100 --batch-size 8 --seq-len 64
        --eval-every 25 --eval-tokens 8192 --log-every 10)
run() { name=$1; seed=$2; shift 2; dir="$OUT/$name-s$seed"; again=()
        if [ -f "$dir/ckpt.npz" ]; then again=(--resume)
        elif [ "$OUT" = results/lab ]; then rm -f "$dir/config.json" "$dir/log.jsonl"; fi
        python train.py "${COMMON[@]}" --seed "$seed" --out "$dir" "$@" "${again[@]}"; }
for seed in 0 1; do
  run leviathan        $seed --model leviathan                        # (b-f) the paper's model
  run dense            $seed --model dense                            # (b) its dense twin
  run dense-std0.21    $seed --model dense --set embed_init_std=0.21  # (b) dense table at Leviathan's initial RMS
  run leviathan-rms    $seed --model leviathan --set embed_norm=rms   # (b) RMSNorm on the embeddings
  run dense-rms        $seed --model dense --set embed_norm=rms       # (b) the same for dense
done
for seed in 0 1; do
  run leviathan-sum    $seed --model leviathan --set gen_combine=sum  # (c) a mode is the mean of its factors
  run leviathan-perm   $seed --model leviathan --set id_permutation_seed=1  # (d) ids shuffled first
done
for seed in 0 1; do
  run leviathan-knots8 $seed --model leviathan --set gen_knots=8      # (e) 8 knots instead of 32
done
for seed in 0 1; do
  run leviathan-rank16 $seed --model leviathan --set gen_rank=16      # (e) 16 modes instead of 64
done
