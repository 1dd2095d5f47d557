#!/usr/bin/env bash
# Every run and figure behind EXERCISES.md and ANSWERS.md, one command per exercise. From the
# repository root (each run: 3-13 minutes on 2 cores; the exercises give their measured times):
#   bash results/lab/commands.sh core    # the core lab: (b)'s pair with two seeds, then (f), (g), (h)
#   bash results/lab/commands.sh b       # one exercise (a b c d e f g h): its runs, then its numbers
#   bash results/lab/commands.sh         # every run (all 18), as before
#   bash results/lab/commands.sh --redo-results b   # replaces the committed runs in results/lab on purpose
# Runs go to runs/lab/<run>, figures to runs/lab/inside and runs/lab/plots; compare with results/lab.
# A run already in the folder is resumed from its checkpoint (a finished one does nothing). The four
# runs of (b)'s pair also keep params-step10.npz and params-step30.npz for (f)'s scale figure: they
# stop at steps 10 and 30 and resume (bit for bit the same losses as one uninterrupted run).
set -euo pipefail
OUT=runs/lab
if [ "${1:-}" = "--redo-results" ]; then OUT=results/lab; shift; fi
COMMON=(--size tiny --data corpus/minipile/00.jsonl.zst corpus/minipile/01.jsonl.zst
        --val-data corpus/minipile/val.jsonl.zst --steps 100 --batch-size 8 --seq-len 64
        --eval-every 25 --eval-tokens 8192 --log-every 10)
last_step() { python -c "import json, sys; print(max([json.loads(l)['step'] for l in open(sys.argv[1])], default=0))" \
              "$1/log.jsonl" 2>/dev/null || echo 0; }
run() { name=$1; seed=$2; shift 2; dir="$OUT/$name-s$seed"
        if [ ! -f "$dir/ckpt.npz" ] && [ "$OUT" = results/lab ]; then rm -f "$dir/config.json" "$dir/log.jsonl"; fi
        for stop in ${STOPS:-} 100; do
          if [ "$stop" != 100 ] && { [ -f "$dir/params-step$stop.npz" ] || [ "$(last_step "$dir")" -ge "$stop" ]; }; then
            continue; fi  # snapshot made, or the run is past it (then (f)'s scale figure lacks that step)
          again=(); if [ -f "$dir/ckpt.npz" ]; then again=(--resume); fi
          python train.py "${COMMON[@]}" --seed "$seed" --out "$dir" "$@" --stop-after "$stop" "${again[@]}"
          if [ "$stop" != 100 ]; then cp "$dir/params.npz" "$dir/params-step$stop.npz"; fi
        done; }
# Validation loss at steps 25, 50, 100 of each run, and its difference from the first run named.
table() { python - "$OUT" "$@" <<'EOF'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
val = {r: {x["step"]: x["val_loss"] for x in map(json.loads, open(f"{out}/{r}/log.jsonl")) if "val_loss" in x}
       for r in runs}
print("| run | step 25 | step 50 | step 100 | run - " + runs[0] + " at 25, 50, 100 |\n|---|---|---|---|---|")
for r in runs:
    print(f"| {r} | " + " | ".join(f"{val[r][s]:.3f}" for s in (25, 50, 100)) + " | "
          + ", ".join(f"{val[r][s] - val[runs[0]][s]:+.3f}" for s in (25, 50, 100)) + " |")
EOF
}
pair() { for seed in 0 1; do STOPS="10 30" run leviathan $seed --model leviathan; STOPS="10 30" run dense $seed --model dense; done; }
a() { python -c "import leviathan as lv; [print(V, [(lv.digit_base(V, k), k * lv.digit_base(V, k)) for k in (2, 3, 4)]) for V in (200_376, 100_277, 257)]"
      python leviathan.py; }
b() { pair
      for seed in 0 1; do
        run dense-std0.21 $seed --model dense --set embed_init_std=0.21  # dense table at Leviathan's initial RMS
        run leviathan-rms $seed --model leviathan --set embed_norm=rms   # RMSNorm on the embeddings
        run dense-rms     $seed --model dense --set embed_norm=rms       # the same for dense
      done
      for seed in 0 1; do table leviathan-s$seed dense-s$seed dense-std0.21-s$seed leviathan-rms-s$seed dense-rms-s$seed; done; }
c() { for seed in 0 1; do run leviathan-sum $seed --model leviathan --set gen_combine=sum; done  # mean of the factors
      python -c "
import jax, jax.numpy as jnp, leviathan as lv
for combine in ('product', 'sum'):
    for seed in (0, 1):
        cfg = lv.config('tiny', gen_combine=combine); e = lv.embed(lv.init_params(jax.random.key(seed), cfg), jnp.arange(0, 200_376, 97), cfg)
        spread = e - e.mean(0)
        print(combine, seed, 'RMS %.3f' % (e ** 2).mean() ** 0.5, 'spread/RMS %.4f' % ((spread ** 2).mean() / (e ** 2).mean()) ** 0.5,
              'mean row share %.5f' % (1 - (spread ** 2).mean() / (e ** 2).mean()))"
      for seed in 0 1; do table leviathan-s$seed leviathan-sum-s$seed dense-s$seed; done; }
d() { for seed in 0 1; do run leviathan-perm $seed --model leviathan --set id_permutation_seed=1; done  # ids shuffled first
      for seed in 0 1; do table leviathan-s$seed leviathan-perm-s$seed; done; }
e() { for seed in 0 1; do run leviathan-knots8 $seed --model leviathan --set gen_knots=8; done   # 8 knots, not 32
      for seed in 0 1; do run leviathan-rank16 $seed --model leviathan --set gen_rank=16; done   # 16 modes, not 64
      for seed in 0 1; do table leviathan-s$seed leviathan-knots8-s$seed leviathan-rank16-s$seed; done; }
f() { pair; python inside.py "$OUT"/leviathan-s{0,1} "$OUT"/dense-s{0,1} --out "$OUT/inside"; }
f_more() { d; e; for v in perm knots8 rank16; do python inside.py "$OUT"/leviathan-$v-s{0,1} --out "$OUT/inside-$v"; done; }
g() { pair; python plot.py "$OUT"/leviathan-s{0,1} "$OUT"/dense-s{0,1} --out "$OUT/plots" | grep "bucket"; }
h() { python plot.py results/tiny-minipile --out runs/lab/plots-headline | grep -v "^wrote"; }
all() { b; c; d; e; }
case "${1:-all}" in
  core) pair; f; g; h ;;
  a|b|c|d|e|f|f_more|g|h|all) "${1:-all}" ;;
  *) echo "error: unknown exercise '$1'; use core, a, b, c, d, e, f, f_more, g, h or all." >&2; exit 2 ;;
esac
