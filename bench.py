"""Benchmark: Leviathan against its dense twin, in one process, and the data loader alone.

    python bench.py --size 60M --batch-size 8 --micro-batch 8       # model step time, both models
    python bench.py --size 421M --batch-size 64 --micro-batch 16    # on a GPU (bfloat16 by default)
    python bench.py --report                                         # the whole accelerator check
    python bench.py --loader                                         # data loader tokens/s
    python bench.py --loader --data ../shared/minipile/00.jsonl.zst ../shared/minipile/01.jsonl.zst

Model mode runs warm-up then timed optimizer steps on synthetic batches whose ids follow a Zipf law
(about as many distinct ids per batch as real text; or real tokens with --data) and prints, per
model: compile time, ms/step, tokens/s, MFU (where the device's peak is known), the generator's
share of the step, peak device memory (where the backend reports it: the process's peak so far, so
a later model's figure can include an earlier one's) and XLA's compiled memory for the step (the
per-model figure); then the Leviathan/dense step-time ratio.

--report runs the whole check in one command (at most ~8 minutes on one H200): 60M and 421M, both
models, the paper's 512 x 512-token batch with a micro-batch that fits, Zipf ids, bfloat16; it prints
a markdown report (device, JAX version, every figure above, the ratios) and writes it to
--report-file. On a CPU it runs a reduced version (smaller batches) in a few minutes.
"""

import argparse
import datetime
import time

import jax
import numpy as np

import data
import leviathan as lv


def zipf_tokens(rng, n_seqs, seq_len, vocab_size, exponent=1.0):
    """Token sequences (n_seqs, seq_len + 1) with Zipf-distributed ids, like natural text."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    p = 1.0 / (ranks + 2.7) ** exponent  # Zipf-Mandelbrot: close to token counts of English text
    ids = rng.permutation(vocab_size)[rng.choice(vocab_size, (n_seqs, seq_len + 1), p=p / p.sum())]
    return ids.astype(np.int32)


def real_tokens(paths, n_seqs, seq_len):
    """Sequences packed from local .jsonl.zst shards with the o200k tokenizer (first n_seqs)."""
    stream = data.token_sequences(data.resolve_sources(paths, "--data"), data.tokenizer("o200k_base"), seq_len)
    return np.stack([next(stream) for _ in range(n_seqs)]).astype(np.int32)


def prepare_model(cfg, host_batch):
    """Initial state, device batch and compiled step of one model, with its compile time."""
    state = lv.init_state(jax.random.key(0), cfg)
    batch = lv.shard_batch(host_batch)
    start = time.perf_counter()
    compiled = lv.make_train_step(cfg).lower(state, batch).compile()
    return {"cfg": cfg, "state": state, "batch": batch, "step": compiled,
            "compile_s": time.perf_counter() - start, "memory": compiled.memory_analysis()}


def time_steps(model, n_steps):
    """Mean seconds per step of n_steps optimizer steps of a prepared model (its state carried on)."""
    start = time.perf_counter()
    for _ in range(n_steps):
        model["state"], metrics = model["step"](model["state"], model["batch"])
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n_steps


MIN_ROUNDS, MAX_ROUNDS = 3, 50  # --rounds 0: as many as fit --budget, within these bounds


def interleaved_rounds(models, n_steps, rounds, budget_s):
    """Seconds per step of each model, one list per model, timed round by round: n_steps of one model,
    then n_steps of the other, the order alternating (A B, B A, A B, ...), so both see the same load
    on the machine. After one warm-up step each; rounds 0: as many as fit budget_s seconds."""
    warm = [time_steps(m, 1) for m in models]
    if not rounds:
        rounds = int(min(max(budget_s // (n_steps * sum(warm)), MIN_ROUNDS), MAX_ROUNDS))
    times = [[] for _ in models]
    for r in range(rounds):
        for i in (range(len(models)) if r % 2 == 0 else reversed(range(len(models)))):
            times[i].append(time_steps(models[i], n_steps))
    return times


def generator_seconds(cfg, params, ids, n_steps):
    """Seconds per step spent building the embedding table and sending its gradient back."""
    name = lv.EMBEDDING_PARAMS[cfg.model]

    @jax.jit
    def table_fwd_bwd(p, ids):
        table, vjp = jax.vjp(lambda p: lv.embed({name: p}, ids, cfg), p)
        return vjp(table)[0]  # any cotangent of the table's shape costs the same

    jax.block_until_ready(table_fwd_bwd(params[name], ids))
    start = time.perf_counter()
    for _ in range(n_steps):
        out = table_fwd_bwd(params[name], ids)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n_steps


def figures(model, seconds, n_tokens, n_distinct, n_steps):
    """The printed figures of one timed model: median step time of the rounds, and the rest."""
    cfg, state, memory = model["cfg"], model["state"], model["memory"]
    step_s = float(np.median(seconds))
    peak = lv.peak_flops()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "model": cfg.model, "params": lv.count_params(state["params"]), "compile_s": model["compile_s"],
        "ms_per_step": 1e3 * step_s, "rounds_ms": [1e3 * s for s in seconds], "tok_per_s": n_tokens / step_s,
        "mfu": lv.flops_per_step(cfg, n_tokens, n_distinct) / step_s / peak if peak else None,
        "generator_share": generator_seconds(cfg, state["params"], model["batch"]["ids"], n_steps) / step_s,
        "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None,
        "compiled_mem_gb": (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                            + memory.output_size_in_bytes) / 1e9 if memory else None,
    }


# Clipping (square, sum, scale) and AdamW (two moments, bias correction, square root, divide, weight
# decay, learning rate, update): about 20 floating-point operations per parameter and step.
OPTIMIZER_FLOPS = 20


def step_flops(cfg, n_tokens, n_ids):
    """FLOPs the compiled train step does, by the model's own count: lv.flops_per_step, plus the
    forward passes recomputed in the backward pass (each block under cfg.remat; each generator head,
    always), plus the optimizer's. n_ids: the padded distinct ids, every one of which is computed.
    Elementwise work (norms, softmax, spline basis, product) is not counted, in either model."""
    D, L, F = cfg.d_model, cfg.n_layers, cfg.mlp_mult * cfg.d_model
    flops = lv.flops_per_step(cfg, n_tokens, n_ids)
    if cfg.remat:  # one more forward of every block: 2 per parameter-token, 4 L T D per token for attention
        flops += (2 * L * (4 * D * D + 3 * D * F) + 4 * L * cfg.seq_len * D) * n_tokens
    flops += lv.flops_per_step(cfg, 0, n_ids) / 3  # the generator's share (6 per parameter-id) + 2
    return flops + OPTIMIZER_FLOPS * lv.count_params(lv.param_shapes(cfg))


def flop_limit(cfgs, n_tokens, n_ids):
    """The Leviathan / dense step-time ratio that the work alone allows: their step_flops' ratio."""
    flops = {cfg.model: step_flops(cfg, n_tokens, n_ids) for cfg in cfgs}
    return flops["leviathan"] / flops["dense"]


def ratio_summary(results):
    """Leviathan / dense step time, round by round (the two models of a round timed side by side):
    (median, min, max, rounds)."""
    ratios = np.array(results["leviathan"]["rounds_ms"]) / np.array(results["dense"]["rounds_ms"])
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max()), len(ratios)


def ratio_line(results, limit):
    median, low, high, rounds = ratio_summary(results)
    return (f"Leviathan / dense step time: {median:.3f}x (median of {rounds} interleaved rounds, "
            f"min {low:.3f}x, max {high:.3f}x; FLOP limit {limit:.3f}x)")


def show(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def result_row(r):
    return (f"| {r['model']} | {r['params']:,} | {r['compile_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['tok_per_s']:,.0f} | {show(r['mfu'], '.1%')} | {r['generator_share']:.1%} | "
            f"{show(r['peak_mem_gb'], '.2f')} | {show(r['compiled_mem_gb'], '.2f')} |")


TABLE_HEADER = ("| model | params | compile s | ms/step | tokens/s | MFU | generator share | "
                "peak memory GB | compiled memory GB |\n|---|---|---|---|---|---|---|---|---|")


def model_batch(args):
    """The configs of args.models and one host batch for them all, with its count of distinct ids."""
    overrides = dict(seq_len=args.seq_len, batch_size=args.batch_size,
                     micro_batch=args.micro_batch, attention=args.attention)
    if args.dtype:
        overrides["dtype"] = args.dtype
    cfgs = [lv.config(args.size, model, **overrides) for model in args.models]
    if args.data:
        tokens = real_tokens(args.data, args.batch_size, args.seq_len)
    else:
        tokens = zipf_tokens(np.random.default_rng(0), args.batch_size, args.seq_len, cfgs[0].vocab_size)
    host_batch = lv.prepare_batch(tokens)
    n_distinct = int(host_batch["inverse"].max()) + 1  # ids before padding
    print(f"{args.size}: batch {args.batch_size} x {args.seq_len} tokens (micro-batch "
          f"{args.micro_batch or args.batch_size}), {n_distinct:,} distinct ids -> bucket "
          f"{len(host_batch['ids']):,}, dtype {cfgs[0].dtype}, {jax.devices()[0].device_kind}")
    return cfgs, host_batch, n_distinct


def run_models(args):
    cfgs, host_batch, n_distinct = model_batch(args)
    models = [prepare_model(cfg, host_batch) for cfg in cfgs]
    seconds = interleaved_rounds(models, args.steps, args.rounds, args.budget)
    n_tokens = host_batch["targets"].size
    print(TABLE_HEADER)
    results = {}
    for model, s in zip(models, seconds):
        r = results[model["cfg"].model] = figures(model, s, n_tokens, n_distinct, args.steps)
        print(result_row(r), flush=True)
    if len(results) == 2:
        limit = flop_limit(cfgs, n_tokens, len(host_batch["ids"]))
        for r in results.values():
            r["flop_limit"] = limit
        print(ratio_line(results, limit))
    return results


# --report: (size, batch, seq_len, micro-batch, timed steps) per backend. The accelerator rows are the
# paper's 512 x 512-token step; the CPU rows are the same sizes, reduced to run in a few minutes.
REPORT = {
    "gpu": [("60M", 512, 512, 32, 5), ("421M", 512, 512, 16, 3)],
    "cpu": [("tiny", 8, 128, 8, 1), ("60M", 2, 256, 2, 1)],
}


def report_rows(backend, sizes=None):
    rows = REPORT["cpu" if backend == "cpu" else "gpu"]
    return [row for row in rows if sizes is None or row[0] in sizes]


def run_report(args):
    """Every REPORT row, both models: one markdown report, printed and written to args.report_file."""
    device = jax.devices()[0]
    lines = [f"# bench.py --report, {datetime.date.today()}", "",
             f"Device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); "
             f"JAX {jax.__version__}; dtype {lv.default_dtype()}; Zipf ids (about as many distinct ids as "
             "real text); one optimizer step of the batch shown, with AdamW.", ""]
    ratios, results = [], {}
    for size, batch, seq_len, micro, steps in report_rows(jax.default_backend(), args.sizes):
        print(f"\n{size}: {batch} x {seq_len}, micro-batch {micro}", flush=True)
        one = argparse.Namespace(**{**vars(args), "size": size, "batch_size": batch, "seq_len": seq_len,
                                    "micro_batch": micro, "steps": steps, "data": None})
        try:
            r = results[size] = run_models(one)
        except Exception as e:  # noqa: BLE001 -- an OOM is a finding: say so and go on to the next size
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            lines += [f"## {size}: out of device memory at micro-batch {micro}; rerun this size with "
                      f"--sizes {size} after lowering its micro-batch in bench.REPORT", ""]
            continue
        ratio, low, high, rounds = ratio_summary(r)
        limit = r["leviathan"]["flop_limit"]
        lines += [f"## {size}: {batch} x {seq_len} tokens per step, micro-batch {micro}", "", TABLE_HEADER,
                  *(result_row(x) for x in r.values()), "",
                  f"Leviathan / dense step time: **{ratio:.3f}x** (median of {rounds} interleaved rounds, "
                  f"min {low:.3f}x, max {high:.3f}x; FLOP limit {limit:.3f}x)", ""]
        ratios.append(f"{size} {ratio:.3f}x ({low:.3f}-{high:.3f}, limit {limit:.3f}x)")
    lines.append(f"Ratios: {', '.join(ratios)}.")
    text = "\n".join(lines) + "\n"
    with open(args.report_file, "w") as f:
        f.write(text)
    print(f"\n{text}\nreport written to {args.report_file}")
    return results


def run_loader(args):
    paths = args.data or ["../shared/minipile/00.jsonl.zst", "../shared/minipile/01.jsonl.zst"]
    try:
        result = data.loader_throughput(paths, "o200k_base", args.seq_len, args.batch_size,
                                         seconds=args.seconds, threads=args.threads)
    except data.UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"loader: {result['tokens_per_s']:,.0f} tokens/s, o200k_base, {result['batches']} batches of "
          f"{args.batch_size} x {args.seq_len + 1} tokens in {result['seconds']:.1f} s after a "
          f"{result['fill_seconds']:.1f} s shuffle-buffer fill, {args.threads} tokenizer thread(s)")
    return result


def make_parser():
    parser = data.OneLineParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add, whole = parser.add_argument, data.whole
    add("--size", default="tiny", choices=list(lv.SIZES))
    add("--models", nargs="+", default=["leviathan", "dense"], choices=lv.MODELS)
    add("--batch-size", type=whole(1), default=8, help="sequences per optimizer step")
    add("--micro-batch", type=whole(0), default=0, help="sequences per pass, dividing the batch (0: all)")
    add("--seq-len", type=whole(1), default=512)
    add("--steps", type=whole(1), default=1, help="timed steps per model and round")
    add("--rounds", type=whole(0), default=0, help="interleaved rounds (0: as many as fit --budget, 3 or more)")
    add("--budget", type=data.positive, default=120.0, help="--rounds 0: seconds of timed rounds per shape")
    add("--dtype", choices=lv.DTYPES, help="matmul dtype (default: by device)")
    add("--attention", default="xla", choices=lv.ATTENTION)
    add("--data", nargs="+", help="local .jsonl.zst shards for real tokens")
    add("--loader", action="store_true", help="measure the data loader alone")
    add("--report", action="store_true", help="the whole accelerator check (see above)")
    add("--sizes", nargs="+", choices=list(lv.SIZES), help="--report: only these of its sizes")
    add("--report-file", default="bench_report.md", help="--report: markdown written here")
    add("--seconds", type=data.positive, default=20.0, help="loader mode: how long")
    add("--threads", type=whole(1), default=1, help="loader mode: tokenizer threads")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.micro_batch and args.batch_size % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} does not divide --batch-size {args.batch_size}; "
                     "give a divisor of the batch, or 0 for the whole batch")
    if args.report:
        return run_report(args)
    return run_loader(args) if args.loader else run_models(args)


if __name__ == "__main__":
    main()
