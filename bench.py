"""Benchmark: Leviathan against its dense twin, in one process, and the data loader alone.

    python bench.py --size 60M --batch-size 4 --seq-len 512                 # model step time, both models
    python bench.py --size 421M --batch-size 64 --micro-batch 16            # on a GPU (bfloat16 by default)
    python bench.py --size 60M --batch-size 4 --seq-len 512 --breakdown     # both steps, part by part
    python bench.py --size tiny --batch-size 16 --seq-len 128 --profile     # op time per function
    python bench.py --report                                                 # the whole accelerator check
    python bench.py --loader                                                 # data loader tokens/s
    python bench.py --loader --data corpus/minipile/00.jsonl.zst corpus/minipile/01.jsonl.zst

Model mode times the two models interleaved: after a warm-up step each, rounds of --steps steps of one
model then the other, the order alternating, as many rounds as fit --budget seconds (or --rounds), so
that both see the same load on the machine. Batches are synthetic, with ids that follow a Zipf law
(about as many distinct ids per batch as real text; or real tokens with --data). It prints, per model:
compile time, the median ms/step of the rounds (wall clock, and the process's CPU time, which other
programs disturb less), tokens/s, MFU (where the device's peak is known), the generator's share of the
step, peak device memory (where the backend reports it: the process's peak so far) and XLA's compiled
memory for the step; then the Leviathan/dense step-time ratio as the median of the per-round ratios,
with a 95% interval of that median (from 6 rounds; it narrows as rounds are added, where min and max
widen) and their min and max, beside the FLOP limit: the ratio the work alone allows (step_flops).

--breakdown times both steps cut into parts (body, head and loss, gathers, generator or table lookup,
AdamW) and whole, and prints a markdown table with each part's wall and CPU time and fresh memory.

--profile traces --steps compiled steps of each model (jax.profiler) and prints their op time per
leviathan.py function: where the whole step's time goes, fusion included (tested on the CPU backend).

--report runs the whole check in one command: 60M and 421M, both models, the paper's 512 x 512-token
batch with a micro-batch that fits, Zipf ids, bfloat16 (2.5 minutes on one H200 with --budget 40); it
prints a markdown report (device, JAX version, every figure above, the ratios) and writes it to
--report-file. On a CPU it runs a reduced version (smaller batches) in a few minutes.
"""

import argparse
import collections
import datetime
import functools
import glob
import gzip
import itertools
import json
import math
import os
import re
import resource
import tempfile
import time

from machinery import cli  # no JAX in it: quick to load

if __name__ == "__main__":  # a Ctrl-C, even while JAX loads, ends in one sentence
    cli.end_on_ctrl_c("interrupted; bench.py writes only its --report file, at the end, so nothing is lost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import data  # noqa: E402
import leviathan as lv  # noqa: E402
from machinery.cli import number  # noqa: E402


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
    """Mean seconds per step of n_steps optimizer steps of a prepared model (its state carried on):
    (wall-clock, CPU). CPU seconds are the process's, all threads, user and system: the work done,
    which other programs on the machine disturb less than the wall clock."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n_steps):
        model["state"], metrics = model["step"](model["state"], model["batch"])
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / n_steps, (time.process_time() - start_cpu) / n_steps


MIN_ROUNDS, MAX_ROUNDS = 3, 50  # --rounds 0: as many as fit --budget, within these bounds


def interleaved_rounds(models, n_steps, rounds, budget_s):
    """(wall, CPU) seconds per step of each model, one list per model, round by round: n_steps of one model,
    then n_steps of the other, the order alternating (A B, B A, A B, ...), so both see the same load
    on the machine. After one warm-up step each; rounds 0: as many as fit budget_s seconds."""
    warm = [time_steps(m, 1)[0] for m in models]
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
    table_fwd_bwd = backward_of(lambda p, ids: lv.embed({name: p}, ids, cfg))  # the breakdown's part
    jax.block_until_ready(table_fwd_bwd(params[name], ids))
    start = time.perf_counter()
    for _ in range(n_steps):
        out = table_fwd_bwd(params[name], ids)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n_steps


def figures(model, times, n_tokens, n_distinct, n_steps):
    """The printed figures of one timed model: median step time of the rounds, and the rest."""
    cfg, state, memory = model["cfg"], model["state"], model["memory"]
    seconds, cpu_seconds = zip(*times)
    step_s = float(np.median(seconds))
    peak = lv.peak_flops()
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "model": cfg.model, "params": lv.count_params(state["params"]), "compile_s": model["compile_s"],
        "ms_per_step": 1e3 * step_s, "rounds_ms": [1e3 * s for s in seconds],
        "cpu_ms_per_step": 1e3 * float(np.median(cpu_seconds)), "rounds_cpu_ms": [1e3 * s for s in cpu_seconds],
        "tok_per_s": n_tokens / step_s,
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
    forward passes recomputed in the backward pass (each block under cfg.remat; each generator head
    where lv.recompute_heads), plus what sparse_head does beyond its 3-knot maths, plus the
    optimizer's. n_ids: the padded distinct ids, every one of which is computed. Elementwise work
    (norms, softmax, spline basis, product) is not counted, in either model."""
    D, L, F = cfg.d_model, cfg.n_layers, cfg.mlp_mult * cfg.d_model
    flops = lv.flops_per_step(cfg, n_tokens, n_ids)
    if cfg.remat:  # one more forward of every block: 2 per parameter-token, 4 L T D per token for attention
        flops += (2 * L * (4 * D * D + 3 * D * F) + 4 * L * cfg.seq_len * D) * n_tokens
    if cfg.model == "leviathan":
        d, G, R = cfg.d_seed, cfg.gen_knots, cfg.gen_rank
        sparse = lv.uses_sparse_head(cfg)
        knots = 3 if sparse else G  # the spline mixing's knots per coordinate
        if sparse:
            # its backward pass mixes by the dense form's two matmuls (4 d G R per id, where 3 knots
            # count 4 d 3 R) and sums the 3-knot factors again (2 d 3 R)
            flops += cfg.gen_heads * (4 * d * G * R - 12 * d * R + 6 * d * R) * n_ids
        if lv.recompute_heads(cfg):
            # each head's forward again up to its modes (W z and the mixing): the backward pass needs
            # the modes, not their projection to d_model, so XLA drops that matmul from the recomputation
            flops += 2 * cfg.gen_heads * (d * d + d * knots * R) * n_ids
    return flops + OPTIMIZER_FLOPS * lv.count_params(lv.param_shapes(cfg))


def flop_limit(cfgs, n_tokens, n_ids):
    """The Leviathan / dense step-time ratio that the work alone allows: their step_flops' ratio."""
    flops = {cfg.model: step_flops(cfg, n_tokens, n_ids) for cfg in cfgs}
    return flops["leviathan"] / flops["dense"]


def round_ratios(results, key="rounds_ms"):
    """Leviathan / dense step time, round by round (the two models of a round timed side by side).
    key "rounds_cpu_ms": the same for CPU time."""
    return np.array(results["leviathan"][key]) / np.array(results["dense"][key])


def ratio_summary(results, key="rounds_ms"):
    """The per-round ratios (round_ratios) summed up: (median, min, max, rounds)."""
    ratios = round_ratios(results, key)
    return float(np.median(ratios)), float(ratios.min()), float(ratios.max()), len(ratios)


def median_interval(values, level=0.95):
    """A confidence interval for the median of the distribution the values come from, assuming nothing
    about its shape: the j-th smallest and j-th largest value, for the largest j that covers the median
    with probability >= level (each value falls below the median with probability 1/2, so the number
    below is Binomial(n, 1/2)). None when even (min, max) covers less: fewer than 6 values at 95%."""
    x, n = np.sort(values), len(values)

    def coverage(j):  # P(x_(j) <= median <= x_(n+1-j)) = P(j <= Binomial(n, 1/2) <= n - j)
        return sum(math.comb(n, k) for k in range(j, n - j + 1)) / 2**n

    if n == 0 or coverage(1) < level:
        return None
    j = 1
    while 2 * (j + 1) <= n and coverage(j + 1) >= level:
        j += 1
    return float(x[j - 1]), float(x[n - j])


def interval_text(results):
    """", 95% interval of the median 1.063x-1.095x" for the ratio line, or "" under 6 rounds."""
    interval = median_interval(round_ratios(results))
    return f", 95% interval of the median {interval[0]:.3f}x-{interval[1]:.3f}x" if interval else ""


def ratio_line(results, limit):
    median, low, high, rounds = ratio_summary(results)
    cpu, cpu_low, cpu_high, _ = ratio_summary(results, "rounds_cpu_ms")
    return (f"Leviathan / dense step time: {median:.3f}x (median of {rounds} interleaved rounds"
            f"{interval_text(results)}, "
            f"min {low:.3f}x, max {high:.3f}x; CPU time {cpu:.3f}x, {cpu_low:.3f}x-{cpu_high:.3f}x; "
            f"FLOP limit {limit:.3f}x)")


def show(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def result_row(r):
    return (f"| {r['model']} | {r['params']:,} | {r['compile_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['cpu_ms_per_step']:.0f} | "
            f"{r['tok_per_s']:,.0f} | {show(r['mfu'], '.1%')} | {r['generator_share']:.1%} | "
            f"{show(r['peak_mem_gb'], '.2f')} | {show(r['compiled_mem_gb'], '.2f')} |")


TABLE_HEADER = ("| model | params | compile s | ms/step | CPU ms/step | tokens/s | MFU | generator share | "
                "peak memory GB | compiled memory GB |\n|---|---|---|---|---|---|---|---|---|---|")


def memory_pages():
    """How fresh memory reaches this process: XLA's CPU backend maps each step's temporary buffer
    anew (GBs: the logits and their gradient), so the cost of its page faults is part of both steps.
    Huge pages (the kernel's transparent_hugepage mode "always", or "madvise" with
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1) make that hundreds of times fewer faults."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        thp = "n/a"
    return f"transparent huge pages: {thp}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"


def model_batch(args):
    """The configs of args.models and one host batch for them all, with its count of distinct ids."""
    overrides = dict(seq_len=args.seq_len, batch_size=args.batch_size,
                     micro_batch=args.micro_batch, attention=args.attention)
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.mixing:
        overrides["sparse_mixing"] = args.mixing == "sparse"
    cfgs = [lv.config(args.size, model, **overrides) for model in args.models]
    if args.data:
        tokens = real_tokens(args.data, args.batch_size, args.seq_len)
    else:
        tokens = zipf_tokens(np.random.default_rng(0), args.batch_size, args.seq_len, cfgs[0].vocab_size)
    host_batch = lv.prepare_batch(tokens)
    n_distinct = int(host_batch["inverse"].max()) + 1  # ids before padding
    print(f"{args.size}: batch {args.batch_size} x {args.seq_len} tokens (micro-batch "
          f"{args.micro_batch or args.batch_size}), {n_distinct:,} distinct ids -> bucket "
          f"{len(host_batch['ids']):,}, dtype {cfgs[0].dtype}, {jax.devices()[0].device_kind}"
          + (f"; {memory_pages()}" if jax.default_backend() == "cpu" else ""))
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


def blocks(layers, x, cfg):
    """The transformer's blocks alone, as lv.transformer runs them (scan, checkpoint): (B, T, D) -> (B, T, D)."""
    cos, sin = lv.rope_tables(x.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_theta)
    layer_fn = functools.partial(lv.block, cos=cos, sin=sin, cfg=cfg)
    layer_fn = jax.checkpoint(layer_fn) if cfg.remat else layer_fn
    return jax.lax.scan(lambda x, layer: (layer_fn(x, layer), None), x, layers)[0]


def head_loss(p, x, targets, cfg):
    """Final norm, output head and mean cross-entropy of the blocks' output x (B, T, D)."""
    dt = jnp.dtype(cfg.dtype)
    logits = lv.rms_norm(x, p["final_norm"], cfg.norm_eps).astype(dt) @ p["head"].astype(dt)
    return lv.cross_entropy(logits, targets).mean()


def backward_of(fn):
    """fn(p, *rest)'s forward and backward in p, jitted: (p, *rest) -> the gradient in p, for a
    cotangent of ones. The batch's arrays come in as arguments: as constants, XLA would fold them."""
    def run(p, *rest):
        out, vjp = jax.vjp(lambda p: fn(p, *rest), p)
        return vjp(jax.tree_util.tree_map(jnp.ones_like, out))[0]
    return jax.jit(run)


def step_parts(model):
    """A prepared model's train step cut into its parts: name -> (jitted function, a function of the
    model's current state giving its arguments; the step donates the state, so it is read at each
    call). Each part runs its forward and backward (and recomputation) on the step's shapes."""
    cfg, batch, params = model["cfg"], model["batch"], model["state"]["params"]
    name = lv.EMBEDDING_PARAMS[cfg.model]
    table = lv.embed(params, batch["ids"], cfg)  # (U, D)
    x = table[batch["inverse"]].astype(jnp.float32)  # (B, T, D)
    optimizer = lv.make_optimizer(cfg)

    @jax.jit
    def adamw(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    table_part = "generator" if cfg.model == "leviathan" else "table lookup"
    return {
        "body": (backward_of(lambda lx: blocks(*lx, cfg)), lambda s: ((s["params"]["layers"], x),)),
        "head and loss": (jax.jit(jax.grad(functools.partial(head_loss, cfg=cfg), argnums=(0, 1))),
                          lambda s: ({k: s["params"][k] for k in ("final_norm", "head")}, x, batch["targets"])),
        "position gather": (backward_of(lambda t, inverse: t[inverse]), lambda s: (table, batch["inverse"])),
        table_part: (backward_of(lambda p, ids: lv.embed({name: p}, ids, cfg)),
                     lambda s: (s["params"][name], batch["ids"])),
        "AdamW": (adamw, lambda s: (s["params"], s["opt_state"], s["params"])),
    }


def time_call(fn, args):
    """One call of fn(*args): (wall ms, CPU ms, MB of fresh memory pages it touched: minor page faults)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    new_pages = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return 1e3 * (time.perf_counter() - start), 1e3 * (time.process_time() - start_cpu), new_pages * PAGE_MB


PAGE_MB = resource.getpagesize() / 2**20


BREAKDOWN_ROWS = [  # (part, what it holds)
    ("body", "blocks: forward, recomputed forward, backward"),
    ("head and loss", "final norm, output head, cross-entropy: forward and backward"),
    ("position gather", "table[inverse] and its gradient back to the (U, D) table"),
    ("table lookup", "dense: the table's rows for the ids and the scatter of their gradient"),
    ("generator", "Leviathan: the embeddings of the ids: forward, recomputed forward, backward"),
    ("AdamW", "clipping, AdamW, update, gradient norm"),
]


SHARED_PARTS = ("body", "head and loss", "position gather")  # the same work in both models: timed once


def one_step(model):
    """A call that runs one optimizer step of a prepared model, carrying its state on."""
    def call():
        model["state"], metrics = model["step"](model["state"], model["batch"])
        return metrics
    return call


def run_breakdown(args):
    """Both models' steps, part by part (step_parts) and whole, timed in interleaved rounds: a table."""
    cfgs, host_batch, _ = model_batch(args)
    calls = {}  # (model or "both", part) -> (fn, the model it reads its arguments from, their function)
    for cfg in cfgs:  # one state per model, the parts' and the step's (memory: 60M dense is 1.3 GB)
        model = prepare_model(cfg, host_batch)
        for part, (fn, part_args) in step_parts(model).items():
            calls.setdefault(("both", part) if part in SHARED_PARTS else (cfg.model, part), (fn, model, part_args))
        calls[(cfg.model, "whole step")] = (one_step(model), model, lambda s: ())
    for fn, model, part_args in calls.values():  # compile and warm up
        jax.block_until_ready(fn(*part_args(model["state"])))
    rounds = args.rounds or MIN_ROUNDS
    ms = {key: [] for key in calls}
    for r in range(rounds):
        for key in (list(calls) if r % 2 == 0 else reversed(list(calls))):
            fn, model, part_args = calls[key]
            ms[key].append(time_call(fn, part_args(model["state"])))
    return breakdown_table(ms, rounds)


def breakdown_table(ms, rounds):
    """The markdown table of run_breakdown's medians, printed; returns {model: {part: (wall ms, CPU ms, MB)}}."""
    cell = {"dense": {}, "leviathan": {}}
    for (who, part), values in ms.items():
        for m in (("dense", "leviathan") if who == "both" else (who,)):
            cell[m][part] = tuple(np.median(np.array(values), axis=0))
    for m in cell:
        parts = [cell[m].get(p, (0.0, 0.0, 0.0)) for p, _ in BREAKDOWN_ROWS]
        cell[m]["sum of the parts"] = tuple(np.sum(parts, axis=0))
        cell[m]["rest"] = tuple(np.subtract(cell[m]["whole step"], cell[m]["sum of the parts"]))
    dense_step = cell["dense"]["whole step"][0]
    lines = [f"Median of {rounds} interleaved rounds:", "",
             "| part | what it holds | dense ms | Leviathan ms | Leviathan - dense | of the dense step | "
             "CPU ms, dense / Leviathan | fresh memory MB, dense / Leviathan |", "|---|---|---|---|---|---|---|---|"]
    for part, what in BREAKDOWN_ROWS + [("sum of the parts", ""), ("whole step", "the compiled train step"),
                                        ("rest", "whole step - sum of the parts (fusion across parts, overheads)")]:
        (d, d_cpu, d_mb), (v, v_cpu, v_mb) = (cell[m].get(part, (0.0, 0.0, 0.0)) for m in ("dense", "leviathan"))
        lines.append(f"| {part} | {what} | {d:,.0f} | {v:,.0f} | {v - d:+,.0f} | {(v - d) / dense_step:+.1%} | "
                     f"{d_cpu:,.0f} / {v_cpu:,.0f} | {d_mb:,.0f} / {v_mb:,.0f} |")
    print("\n".join(lines))
    return cell


OP = r"^\s*(?:ROOT )?%?([\w.-]+) = "  # an op's line in a compiled module's text: its name


def op_functions(hlo_text, source="leviathan.py"):
    """{op: the function of `source` it was traced from} for a compiled module's text, where XLA keeps
    each op's stack_frame_id and the tables that resolve it (a frame's file, function and caller). An
    op goes to the innermost frame in `source`; a fused op, to its root's. The ops of a jax.custom_vjp
    function keep no frame of their own there: they go to its caller (spline_basis's to head_factors)."""
    def table(title):  # rows "id {key=value ...}" or "id \"name\"", up to a blank line
        block = re.search(rf"^{title}\n(.*?)(?:\n\n|\Z)", hlo_text, re.M | re.S)
        rows = block.group(1).splitlines() if block else []
        return {int(row.split()[0]): row.split(maxsplit=1)[1] for row in rows}

    def fields(title):  # rows "id {key=number ...}" as {id: {key: number}}
        return {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in table(title).items()}

    files, functions = table("FileNames"), table("FunctionNames")
    locations, frames = fields("FileLocations"), fields("StackFrames")

    def function_of(frame):
        while frame in frames:
            location = locations[int(frames[frame]["file_location_id"])]
            if os.path.basename(files[int(location["file_name_id"])].strip('"')) == source:
                return functions[int(location["function_name_id"])].strip('"')
            frame = int(frames[frame]["parent_frame_id"]) - 1  # the text prints the caller's id + 1; 0: none
        return None

    ops = re.findall(OP + r".*?stack_frame_id=(\d+)", hlo_text, re.M)
    return {op: name for op, frame in ops if (name := function_of(int(frame)))}


def control_flow_ops(hlo_text):
    """The while, conditional and call ops of a compiled module's text. Their time is not counted: on
    XLA's CPU backend a while op's trace event spans its body's ops, which are counted themselves."""
    return set(re.findall(OP + r"[^\n]*?\s(?:while|conditional|call)\(", hlo_text, re.M))


def profile_by_function(model, n_steps):
    """A jax.profiler trace of n_steps steps of a prepared model: ms per step of its ops by
    leviathan.py function (op_functions), "(other ops)" for the rest (optax's, XLA's copies, ops the
    backend ran as a group: a GPU's command buffers), and "(wall clock)" for the steps themselves. Op
    time can be less (time between ops: memory mapping, waits) or more (ops running side by side)."""
    text = model["step"].as_text()
    where, control = op_functions(text), control_flow_ops(text)
    instructions = set(re.findall(OP, text, re.M))
    if not where:
        print("note: this compiled step's text has no stack-frame tables, so every op is under (other ops)")
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            wall, _ = time_steps(model, n_steps)
        [path] = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    ms = collections.Counter({"(wall clock)": 1e3 * wall})
    for e in events:
        args = e.get("args") or {}
        op = args.get("hlo_op", e.get("name"))  # accelerators: the kernel's op; CPU: the op itself
        if e.get("ph") == "X" and op not in control and (op in instructions or "hlo_op" in args):
            ms[where.get(op, "(other ops)")] += e["dur"] / 1e3 / n_steps  # microseconds
    return ms


def run_profile(args):
    """Both models' compiled steps, traced: a markdown table of their op time per leviathan.py function."""
    cfgs, host_batch, _ = model_batch(args)
    ms = {}
    for cfg in cfgs:
        model = prepare_model(cfg, host_batch)
        time_steps(model, 1)  # warm-up
        m = ms[cfg.model] = profile_by_function(model, args.steps)
        m["(all ops)"] = sum(v for k, v in m.items() if k != "(wall clock)")
    dense, lev = (ms.get(m, collections.Counter()) for m in ("dense", "leviathan"))
    shown = {n for n in (*dense, *lev) if not n.startswith("(") and max(dense[n], lev[n]) >= 0.05}  # 0.0: left out
    functions = sorted(shown, key=lambda n: -max(dense[n], lev[n]))
    lines = [f"Op time per step by leviathan.py function, ms ({args.steps} traced step(s) per model):", "",
             "| function | dense ms | Leviathan ms | Leviathan - dense |", "|---|---|---|---|"]
    for name in functions + ["(other ops)", "(all ops)", "(wall clock)"]:
        lines.append(f"| {name} | {dense[name]:,.1f} | {lev[name]:,.1f} | {lev[name] - dense[name]:+,.1f} |")
    print("\n".join(lines))
    return ms


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
        cpu, limit = ratio_summary(r, "rounds_cpu_ms")[0], r["leviathan"]["flop_limit"]
        lines += [f"## {size}: {batch} x {seq_len} tokens per step, micro-batch {micro}", "", TABLE_HEADER,
                  *(result_row(x) for x in r.values()), "",
                  f"Leviathan / dense step time: **{ratio:.3f}x** (median of {rounds} interleaved rounds"
                  f"{interval_text(r)}, min {low:.3f}x, max {high:.3f}x; CPU time {cpu:.3f}x; "
                  f"FLOP limit {limit:.3f}x)", ""]
        ratios.append(f"{size} {ratio:.3f}x ({low:.3f}-{high:.3f}, limit {limit:.3f}x)")
    lines.append(f"Ratios: {', '.join(ratios)}.")
    text = "\n".join(lines) + "\n"
    with open(args.report_file, "w") as f:
        f.write(text)
    print(f"\n{text}\nreport written to {args.report_file}")
    return results


def loader_throughput(paths, encoding="o200k_base", seq_len=512, batch_size=512, seconds=20.0,
                      max_batches=None, shuffle_buffer=data.SHUFFLE_BUFFER, seed=0, threads=1):
    """Tokens/s of the whole loader (decompress, parse, tokenize, pack, shuffle, tally, prepare_batch,
    state) on the calling thread, once the shuffle buffer is full (the fill is timed apart). Stops after
    `seconds` or `max_batches`, whichever comes first."""
    enc = data.tokenizer(encoding) if isinstance(encoding, str) else encoding
    stream = data.BatchStream(data.resolve_sources(paths, "--data"), enc, seq_len, batch_size, seed, shuffle_buffer,
                              threads=threads)
    tally = data.Tally(lv.padded_vocab(enc))

    def produce():  # what train.py does with each batch before the device sees it
        tokens = stream.next_batch()
        tally.add(tokens)
        return lv.prepare_batch(tokens), stream.state(), tally.state()

    t0 = time.perf_counter()
    produce()
    t1 = time.perf_counter()
    for n in itertools.count(1):
        produce()
        elapsed = time.perf_counter() - t1
        if (max_batches is not None and n >= max_batches) or (seconds is not None and elapsed >= seconds):
            break
    tokens = n * batch_size * (seq_len + 1)
    return {"tokens_per_s": tokens / elapsed, "batches": n, "tokens": tokens, "seconds": elapsed,
            "fill_seconds": t1 - t0, "epochs": stream.epoch, "bad_lines": stream.bad_lines,
            "threads": threads, "tokenizer": enc.name, "seq_len": seq_len, "batch_size": batch_size}


def run_loader(args):
    paths = args.data or ["corpus/minipile/00.jsonl.zst", "corpus/minipile/01.jsonl.zst"]
    try:
        result = loader_throughput(paths, "o200k_base", args.seq_len, args.batch_size,
                                         seconds=args.seconds, threads=args.threads)
    except cli.UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"loader: {result['tokens_per_s']:,.0f} tokens/s, o200k_base, {result['batches']} batches of "
          f"{args.batch_size} x {args.seq_len + 1} tokens in {result['seconds']:.1f} s after a "
          f"{result['fill_seconds']:.1f} s shuffle-buffer fill, {args.threads} tokenizer thread(s)")
    return result


def make_parser():
    parser = cli.OneLineParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add, whole = parser.add_argument, number
    add("--size", default="tiny", choices=list(lv.SIZES))
    add("--models", nargs="+", default=["leviathan", "dense"], choices=lv.MODELS)
    add("--batch-size", type=whole(1), default=8, help="sequences per optimizer step")
    add("--micro-batch", type=whole(0), default=0, help="sequences per pass, dividing the batch (0: all)")
    add("--seq-len", type=whole(1), default=512)
    add("--steps", type=whole(1), default=1, help="timed steps per model and round (--profile: traced ones)")
    add("--rounds", type=whole(0), default=0, help="interleaved rounds (0: as many as fit --budget, 3 or more)")
    add("--budget", type=number(0, whole=False, strict=True), default=120.0, help="--rounds 0: seconds of timed rounds per shape")
    add("--dtype", choices=lv.DTYPES, help="matmul dtype (default: by device)")
    add("--attention", default="xla", choices=lv.ATTENTION)
    add("--mixing", choices=("dense", "sparse"), help="Leviathan's spline mixing: the matmul or 3 knots "
        "(Config.sparse_mixing; default: sparse; the lab's sum combine always mixes densely)")
    add("--data", nargs="+", help="local .jsonl.zst shards for real tokens")
    add("--loader", action="store_true", help="measure the data loader alone")
    add("--breakdown", action="store_true", help="both steps part by part: a markdown table")
    add("--profile", action="store_true", help="both steps traced: op time per leviathan.py function")
    add("--report", action="store_true", help="the whole accelerator check (see above)")
    add("--sizes", nargs="+", choices=list(lv.SIZES), help="--report: only these of its sizes")
    add("--report-file", default="bench_report.md", help="--report: markdown written here")
    add("--seconds", type=number(0, whole=False, strict=True), default=20.0, help="loader mode: how long")
    add("--threads", type=whole(1), default=1, help="loader mode: tokenizer threads")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    cli.use_compile_cache()
    if args.micro_batch and args.batch_size % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} does not divide --batch-size {args.batch_size}; "
                     "give a divisor of the batch, or 0 for the whole batch")
    if args.report:
        return run_report(args)
    if args.breakdown:
        return run_breakdown(args)
    if args.profile:
        return run_profile(args)
    return run_loader(args) if args.loader else run_models(args)


if __name__ == "__main__":
    main()
