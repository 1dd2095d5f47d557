"""Train Leviathan, or its dense twin, on the Pile streamed straight from its shards.

    python train.py --size tiny --steps 200 --batch-size 16 --seq-len 128 --eval-every 25 \
        --eval-tokens 16384 --data corpus/minipile/0*.jsonl.zst \
        --val-data corpus/minipile/val.jsonl.zst   # the CPU tier, offline, on the bundled corpus
    python train.py --size 60M                  # GPU: streams the uncopyrighted Pile over HTTP
    python train.py --size 60M --model dense    # its matched dense twin, on the identical tokens
    python train.py --size 60M --resume         # continue a stopped run exactly where it stopped

A run folder (--out, default runs/<size>-<model>) holds config.json, log.jsonl (one JSON object per
logged step, read by plot.py), ckpt.npz (the last good checkpoint) and params.npz (for sample.py).
The model is leviathan.py, the data pipeline data.py; machinery/ holds what a learner may skip
(command-line helpers, the run folder's files, several processes). This file reads top to bottom:

  1. Command line
  2. Config: the model of a command line
  3. The run: data, state (fresh or resumed), checked before anything is compiled
  4. Training: what happens after each step is decided once, in `due`; evaluation is evaluate.py
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time

from machinery import cli  # no JAX in it: quick to load

if __name__ == "__main__":  # a Ctrl-C while JAX loads (seconds) ends in one sentence too
    cli.end_on_ctrl_c("interrupted before training started; there was nothing to save")

import jax  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import leviathan as lv  # noqa: E402
from machinery import checks, processes, run_folder  # noqa: E402
from machinery.cli import BadFlag, UserError, number  # noqa: E402

TOKENS_PER_PARAM = 20  # default length: 20 training tokens per parameter of the dense twin
WARMUP_FRACTION = 0.02  # default warmup: 2% of the steps
MICRO_TOKENS = 8192  # default micro-batch: about this many tokens per device per forward/backward pass
ADJUSTABLE = ("lr", "warmup_steps", "steps", "sparse_mixing")  # may change on --resume (speed, a lower lr)

# ------------------------------------------------------------------------------------------------
# 1. Command line
# ------------------------------------------------------------------------------------------------

# Config fields that have their own flag (or come from one), so --set does not take them
OWN_FLAGS = {"model": "--model", "vocab_size": "--tokenizer", "seq_len": "--seq-len", "batch_size": "--batch-size",
             "micro_batch": "--micro-batch", "steps": "--steps", "warmup_steps": "--warmup", "lr": "--lr",
             "dtype": "--dtype", "attention": "--attention"}


def parser():
    p = cli.OneLineParser(prog="train.py", description="Train Leviathan or its dense twin on streamed Pile "
                          "shards.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, whole = p.add_argument, number  # whole(1): a whole number of 1 or more, like 2000000, 2e6 or 2M
    add("--size", default="60M", choices=list(lv.SIZES), help="model preset")
    add("--model", default="leviathan", choices=lv.MODELS, help="Leviathan or its dense twin")
    add("--data", nargs="+", help="Pile-style .jsonl.zst/.jsonl shards, text files (any other file: a file "
        "is one document), folders of them, globs or http(s) URLs (default: the uncopyrighted Pile)")
    add("--val-data", nargs="+", help="validation data, as --data (default: the Pile's val.jsonl.zst)")
    add("--tokenizer", default="o200k_base", help="a tiktoken encoding, or 'bytes'")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=whole(1), help=f"optimizer steps (default: {TOKENS_PER_PARAM} "
                        "tokens per parameter of the dense twin)")
    length.add_argument("--tokens", type=whole(1), help="training tokens instead of --steps, e.g. 2B")
    add("--stop-after", type=whole(1), help="stop after this step, checkpointed; --resume goes on")
    add("--batch-size", type=whole(1), default=lv.Config.batch_size, help="sequences per optimizer step")
    add("--seq-len", type=whole(1), default=lv.Config.seq_len, help="tokens per sequence")
    add("--micro-batch", type=whole(1), help=f"sequences per pass, all devices together (default: about "
        f"{MICRO_TOKENS} tokens per device); gradients accumulate over the batch")
    add("--lr", type=number(0, whole=False, strict=True), help="peak learning rate (default: the size's)")
    add("--warmup", type=whole(0), help=f"warmup steps (default: {WARMUP_FRACTION * 100:g}%% of the steps)")
    add("--seed", type=whole(0), default=0, help="seeds the model and the data order")
    add("--eval-every", type=whole(0), default=500, help="steps between evaluations, 0: at the end only")
    add("--eval-tokens", type=whole(1), default=2_000_000, help="validation tokens, one sequence or more")
    add("--log-every", type=whole(1), default=10, help="steps between log lines")
    add("--ckpt-every", type=whole(1), default=1000, help="steps between checkpoints")
    add("--out", help="run folder (default: runs/<size>-<model>)")
    add("--resume", action="store_true", help="continue from <out>/ckpt.npz")
    add("--dtype", choices=lv.DTYPES, help="matmul dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    add("--attention", choices=lv.ATTENTION, help="attention kernel (cudnn: NVIDIA's fused kernel)")
    add("--set", type=cli.config_setting(lv.Config, OWN_FLAGS), action="append", default=[],
        metavar="FIELD=VALUE", help="any other Config field, e.g. --set gen_knots=8 (repeatable)")
    add("--shuffle-buffer", type=whole(0), default=data.SHUFFLE_BUFFER, help="sequences shuffled, 0: none")
    add("--loader-threads", type=whole(1), default=max(1, min(8, (os.cpu_count() or 1) - 2)),
        help="tokenizer threads")
    processes.add_flags(p)
    return p


def parse_args(argv=None):
    """The command line, every number checked against its range and the others before any work."""
    p = parser()
    args = p.parse_args(argv)
    if args.micro_batch is not None and args.micro_batch > args.batch_size:
        p.error(f"--micro-batch {args.micro_batch} is larger than --batch-size {args.batch_size}; "
                "give a micro-batch that divides the batch")
    if args.eval_tokens < args.seq_len:
        p.error(f"--eval-tokens {args.eval_tokens} is less than one sequence (--seq-len {args.seq_len}); "
                "give at least that many")
    return args


# ------------------------------------------------------------------------------------------------
# 2. Config
# ------------------------------------------------------------------------------------------------


def default_micro_batch(batch_size, seq_len, n_devices):
    """The largest micro-batch that divides the batch, is a multiple of the device count, and has at
    most MICRO_TOKENS tokens per device."""
    limit = max(1, MICRO_TOKENS // seq_len) * n_devices
    fits = [m for m in range(n_devices, batch_size + 1, n_devices) if batch_size % m == 0 and m <= limit]
    return max(fits) if fits else batch_size


def build_config(args, enc, n_devices):
    """(model Config of a command line, dense twin's parameter count). Steps default to
    TOKENS_PER_PARAM tokens per parameter of the dense twin."""
    B, T, vocab = args.batch_size, args.seq_len, lv.padded_vocab(enc)
    micro = args.micro_batch or default_micro_batch(B, T, n_devices)
    if B % micro or micro % n_devices:
        raise BadFlag(f"--batch-size {B} does not split into micro-batches of {micro}, a multiple of the "
                      f"{n_devices} device(s); change --batch-size or --micro-batch")
    settings = dict(args.set)  # --set FIELD=VALUE
    given = {"lr": args.lr, "dtype": args.dtype, "attention": args.attention}
    overrides = {key: value for key, value in given.items() if value is not None}
    try:
        dense = lv.count_params(lv.param_shapes(lv.config(args.size, "dense", vocab_size=vocab, **settings)))
        steps = args.steps or math.ceil((args.tokens or TOKENS_PER_PARAM * dense) / (B * T))
        warmup = args.warmup if args.warmup is not None else round(WARMUP_FRACTION * steps)
        return lv.config(args.size, args.model, vocab_size=vocab, seq_len=T, batch_size=B, micro_batch=micro,
                         steps=steps, warmup_steps=warmup, **settings, **overrides), dense
    except ValueError as e:  # a --set the model refuses, e.g. embed_init_std for Leviathan
        raise BadFlag(f"--set: {e}") from None


# ------------------------------------------------------------------------------------------------
# 3. The run: data, state (fresh or resumed), checked in an order that fails fast
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What a training run is made of (built by `setup`) and what it tracks as it goes."""

    args: argparse.Namespace
    cfg: lv.Config
    mesh: jax.sharding.Mesh
    peers: processes.Peers  # this process among the run's processes (one, or several)
    settings: dict  # what decides the run's numbers: a resumed run must agree on it
    start: int  # the step it starts from (the checkpoint's, on --resume)
    stop_at: int  # the last step this invocation runs: cfg.steps, or --stop-after
    val: dict  # validation batches (data.load_validation)
    loader: data.Loader  # this process's rows, read ahead in a thread
    tally: data.Tally  # what training has consumed: data_hash, token counts
    first: tuple  # the first (rows, stream state), read before compiling: a bad shard fails early
    state: dict = None  # the train state
    last_saved: int = None  # step of the last checkpoint written by or before this invocation
    signals: processes.Signals = None
    data_failed: bool = False  # the loader met an error: checkpoint what was trained
    started: float = None  # time.perf_counter() when training started
    clock: tuple = None  # (time, step) of the last log line: tokens/s are measured since then

    def path(self, name):
        """A file of the run folder."""
        return os.path.join(self.args.out, name)


def make_stream(args, enc, sources, peers):
    """The training stream of this process: data, tokenizer, seed and batch shape, never --model. Read in
    shares (several processes, or --data-shares), it is this process's shares (processes.Shares)."""
    if peers.count > 1 or (args.data_shares or 1) > 1:  # several processes: Shares.of checks --data-shares
        return processes.Shares.of(args, enc, sources, peers)
    return data.BatchStream(sources, enc, args.seq_len, args.batch_size, args.seed, args.shuffle_buffer,
                            threads=args.loader_threads)


def resume_from(args, settings, stream, tally, peers):
    """(step, state leaves) of the checkpoint --resume continues, its data position loaded into the
    stream and the tally; (0, None) for a new run."""
    if not args.resume:
        return 0, None
    meta, leaves, data_state = run_folder.load_checkpoint(os.path.join(args.out, "ckpt.npz"))
    if changed := run_folder.changed_settings(meta["run"], settings, dataclasses.asdict(lv.Config()), ADJUSTABLE):
        raise UserError(f"--resume: {', '.join(changed)} differ from the checkpointed run; rerun with "
                        "its original flags or choose a new --out")
    if peers.count > 1:
        data_state["stream"] = run_folder.load_data_file(run_folder.data_file(args.out, meta["step"], peers.index))
    stream.load_state(data_state["stream"])
    tally.load_state(data_state["tally"])
    return meta["step"], leaves


def setup(args):
    """A Run, checked in an order that fails fast: flags, run folder, checkpoint, validation data,
    first training batch; only then the model. Writes config.json, and trims log.jsonl on --resume."""
    peers = processes.join(args)
    enc = data.tokenizer(args.tokenizer)
    sources = data.resolve_sources(args.data or data.DEFAULT_DATA, "--data")
    val_sources = data.resolve_sources(args.val_data or data.DEFAULT_VAL, "--val-data")
    mesh = lv.make_mesh()
    cfg, dense_params = build_config(args, enc, mesh.size)
    checks.attention(cfg)
    args.out = args.out or os.path.join("runs", f"{args.size}-{args.model}")
    run_folder.check_out(args.out, args.resume)
    settings = {"config": dataclasses.asdict(cfg), "data": sources, "val_data": val_sources, "tokenizer": enc.name,
                "seed": args.seed, "shuffle_buffer": args.shuffle_buffer, "eval_tokens": args.eval_tokens,
                "data_shares": args.data_shares or peers.count}
    stream, tally = make_stream(args, enc, sources, peers), data.Tally(cfg.vocab_size)
    start, leaves = resume_from(args, settings, stream, tally, peers)
    val = data.load_validation(val_sources, enc, cfg.seq_len, args.eval_tokens, cfg.micro_batch, mesh.size)
    loader = data.Loader(stream)
    run = Run(args, cfg, mesh, peers, settings, start, min(args.stop_after or cfg.steps, cfg.steps), val, loader,
              tally, first=next(loader), last_saved=start if args.resume else None)
    run.state = lv.init_state(jax.random.key(args.seed), cfg, mesh)
    if leaves is not None:
        run.state = run_folder.restore_state(run.state, leaves)
    write_config(run, enc, dense_params)
    return run


def write_config(run, enc, dense_params):
    """config.json (README: "Run folder format"), a fresh or trimmed log.jsonl, and the first lines."""
    args, cfg, params = run.args, run.cfg, run.state["params"]
    config = {"model": args.model, "size": args.size, "seed": args.seed, "n_params": lv.count_params(params),
              "n_params_embedding": lv.count_params(params[lv.EMBEDDING_PARAMS[args.model]]),
              "n_params_dense_twin": dense_params, "steps": cfg.steps, "tokens_per_step": cfg.batch_size * cfg.seq_len,
              "val_tokens": run.val["tokens"], "val_bytes": run.val["bytes"], "eot_token": enc.eot_token,
              "eval_every": args.eval_every, "log_every": args.log_every, "ckpt_every": args.ckpt_every,
              "n_devices": run.mesh.size, "n_processes": run.peers.count, "device_kind": jax.devices()[0].device_kind,
              "command": sys.argv, "set": dict(args.set), **run.settings}
    if run.peers.index == 0:  # process 0 alone writes the run folder's files
        os.makedirs(args.out, exist_ok=True)
        run_folder.write_atomically(run.path("config.json"), json.dumps(config, indent=1).encode())
        log = run.path("log.jsonl")
        run_folder.truncate_log(log, run.start) if args.resume else open(log, "w").close()
    print(f"{args.model} {args.size}: {config['n_params']:,} parameters, {cfg.steps:,} steps of "
          f"{cfg.batch_size} x {cfg.seq_len} tokens, micro-batch {cfg.micro_batch}, {run.mesh.size} "
          f"device(s), {f'resuming at step {run.start}' if args.resume else 'from scratch'} -> {args.out}")
    for note in checks.notes(cfg, run.mesh.size):
        print(note, flush=True)


def batches(run):
    """(batch, (data state after it, distinct ids in it)) for lv.train_loop. Each process's rows are
    gathered into the global batch (one process: as they are), tallied and turned into a batch dict
    here, in the main thread, so that the gather never interleaves with the train step's collectives."""
    rows, stream_state = run.first
    while True:
        tokens = run.peers.gather(rows)  # (B, T+1)
        run.tally.add(tokens)
        batch = lv.prepare_batch(tokens, run.mesh.size)
        yield batch, ({"stream": stream_state, "tally": run.tally.state()}, int(batch["inverse"].max()) + 1)
        try:
            rows, stream_state = next(run.loader)
        except data.DataError:
            run.data_failed = True
            raise


# ------------------------------------------------------------------------------------------------
# 4. Training
# ------------------------------------------------------------------------------------------------

NEEDS_STATE = {"eval", "checkpoint", "stop"}  # what needs the train state itself, not only the metrics


def due(run, step):
    """What happens after `step`, decided here and nowhere else: a subset of {"log", "eval", "checkpoint",
    "stop"}. Several processes vote on a signal, so that a signal to any stops them all at this step."""
    every, todo = run.args, set()
    if step in (run.start + 1, run.stop_at) or step % every.log_every == 0:
        todo.add("log")
    if step == run.cfg.steps or (every.eval_every and step % every.eval_every == 0):
        todo |= {"log", "eval"}
    if step == run.stop_at or step % every.ckpt_every == 0:
        todo.add("checkpoint")
    if run.peers.vote(f"stop/{step}", run.signals.received is not None):
        todo |= {"checkpoint", "stop"}
    return todo


def log_step(run, step, metrics, state, data_state, n_ids, with_eval):
    """Append the step's line to log.jsonl (with an evaluation if with_eval) and print it."""
    now, (then, then_step) = time.perf_counter(), run.clock
    stream, tally, tokens_per_step = data_state["stream"], data_state["tally"], run.cfg.batch_size * run.cfg.seq_len
    r = {"step": step, "tokens": step * tokens_per_step, "epoch": stream["epoch"], "train_loss": metrics["loss"],
         "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
         "tok_per_s": (step - then_step) * tokens_per_step / (now - then), "mfu": None,
         "elapsed_s": now - run.started, "data_hash": tally["data_hash"], "bad_lines": stream["bad_lines"]}
    if peak := lv.peak_flops():
        r["mfu"] = lv.flops_per_step(run.cfg, tokens_per_step, n_ids) * r["tok_per_s"] / tokens_per_step / (
            peak * run.mesh.size)
    if with_eval:
        eval_step = lv.make_eval_step(run.cfg, run.mesh)
        r.update(evaluate.validation_loss(eval_step, state["params"], run.val, tally["counts"], run.mesh),
                 documents=stream["documents"])
    if run.peers.index == 0:  # process 0 alone writes the run folder's files
        run_folder.append_log(run.path("log.jsonl"), r)
    eta = checks.duration((now - run.started) / (step - run.start) * (run.stop_at - step))
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    line = (f"step {step}/{run.cfg.steps} | loss {r['train_loss']:.4f} | lr {r['lr']:.2e} | grad norm "
            f"{r['grad_norm']:.3f} | {r['tok_per_s']:,.0f} tok/s | MFU {mfu} | data {r['data_hash'][:8]} | ETA {eta}")
    if with_eval:
        bpb = "n/a" if r["val_bpb"] is None else f"{r['val_bpb']:.4f}"
        line += f"\n  eval: val loss {r['val_loss']:.4f} nats/token, {bpb} bits/byte"
    print((f"[process {run.peers.index}] " if run.peers.count > 1 else "") + line, flush=True)
    run.clock = time.perf_counter(), step  # an evaluation's time does not count as training


def save(run, step, state, data_state):
    """Checkpoint the state after `step`. With several processes each first writes its data position
    of that step and all wait for each other; then process 0 writes ckpt.npz (which names the step, so
    an interrupted save leaves the previous checkpoint and its data files whole) and params.npz."""
    if not bool(run_folder.all_finite(state)):
        raise UserError(f"the state after step {step} is not finite, so it was not saved; {checkpoint_hint(run)}")
    if run.peers.count > 1:
        run_folder.save_npz(run_folder.data_file(run.args.out, step, run.peers.index), data_state["stream"])
        run.peers.barrier(f"checkpoint/{step}")
        data_state = {"tally": data_state["tally"]}
    if run.peers.index == 0:  # process 0 alone writes the run folder's files
        run_folder.save_checkpoint(run.path("ckpt.npz"), state, data_state, {"step": step, "run": run.settings})
        lv.save_params(run.path("params.npz"), state["params"], run.cfg, step=step, tokenizer=run.settings["tokenizer"])
        print(f"checkpoint: step {step} -> {run.path('ckpt.npz')} (parameters alone: {run.path('params.npz')})",
              flush=True)
    if run.peers.count > 1:
        run.peers.barrier(f"saved/{step}")
        run_folder.drop_data_files(run.args.out, run.peers.index, step)
    run.last_saved = step


def checkpoint_hint(run):
    """What a run that cannot go on leaves to resume from, and how, for its sentence."""
    if run.last_saved is None:
        return "no checkpoint had been saved yet; lower --lr and start again"
    return f"the last good checkpoint (step {run.last_saved}) is kept: lower --lr and resume from it"


def on_step(run, step, metrics, state, info, todo):
    """lv.train_loop's callback: stop on divergence, then log, evaluate, checkpoint, stop, as due."""
    data_state, n_ids = info
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        raise UserError(f"training diverged by step {step} (loss {metrics['loss']}, grad norm "
                        f"{metrics['grad_norm']}), so nothing more was saved; {checkpoint_hint(run)}")
    if "log" in todo:
        log_step(run, step, metrics, state, data_state, n_ids, with_eval="eval" in todo)
    if state is not None and ("checkpoint" in todo or run.data_failed):
        save(run, step, state, data_state)
    if state is not None and "stop" in todo:
        by = signal.Signals(run.signals.received).name if run.signals.received else "a signal to another process"
        raise processes.Stopped(f"stopped by {by} after step {step}, " + (
            "the last: the run is complete and saved" if step == run.cfg.steps else
            "which is checkpointed; rerun the same command with --resume to continue"))


def train(args):
    run = setup(args)
    run.signals = processes.Signals(lambda: run.last_saved)
    run.started = time.perf_counter()
    run.clock = run.started, run.start
    try:
        lv.train_loop(run.state, batches(run), lv.make_train_step(run.cfg, run.mesh), run.stop_at - run.start,
                      on_step=lambda *a: on_step(run, *a), due=lambda step: due(run, step),
                      needs_state=NEEDS_STATE, mesh=run.mesh)
    finally:
        run.peers.closing.set()
        run.loader.close()
        run.signals.close()
    more = "" if run.stop_at == run.cfg.steps else "; --resume continues"
    print(f"done: {run.stop_at} of {run.cfg.steps} steps, "
          f"{run.stop_at * run.cfg.batch_size * run.cfg.seq_len:,} tokens -> {run.args.out}{more}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    cli.use_compile_cache()
    try:
        return train(args)
    except UserError as e:
        if processes.several(args):
            cli.exit_now(e, e.code)
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except jax.errors.JaxRuntimeError as e:
        if not processes.several(args):
            raise
        cli.exit_now(f"a collective between the processes failed ({str(e).splitlines()[0][:120]}), so one "
                     "has probably stopped; the last good checkpoint is kept: rerun every process with --resume", 1)


if __name__ == "__main__":
    sys.exit(main())
