"""Train Leviathan, or its dense twin, on the Pile streamed straight from its shards.

    python train.py --size 60M                  # GPU: streams the uncopyrighted Pile over HTTP
    python train.py --size 60M --model dense    # its matched dense twin, on the identical tokens
    python train.py --size 60M --resume         # continue a stopped run exactly where it stopped
    python train.py --size 421M --distributed --coordinator 10.0.0.1:29500 --num-processes 2 \
        --process-id 0                          # one of two machines (README: Many devices)
    python train.py --size tiny --steps 200 --batch-size 16 --seq-len 128 --eval-every 25 \
        --eval-tokens 16384                        # the CPU tier: streams only the Pile's first megabytes
    python train.py --size tiny --data book.txt --val-data other.txt --steps 200 --batch-size 16 \
        --seq-len 128 --eval-every 25 --eval-tokens 16384       # offline: any text (a file is a document)

A run folder (--out, default runs/<size>-<model>) holds config.json, log.jsonl (one JSON object per
logged step, read by plot.py), ckpt.npz (the last good checkpoint, to resume) and params.npz (its
parameters alone, for sampling: lv.load_params). The data pipeline is in
data.py, the model and its jitted step in leviathan.py. This file reads top to bottom:

  1. Command line
  2. The run: its processes (one, or several with --distributed), config, data and state, checked
     before anything is compiled
  3. Evaluation: a fixed token budget, bits per byte, loss by token-frequency bucket
  4. Checkpoints and logs
  5. Training: what happens after each step is decided in one place, `actions`
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

import data
import jax
import jax.numpy as jnp
import leviathan as lv
from data import DataError, UserError

TOKENS_PER_PARAM = 20  # default length: 20 training tokens per parameter of the dense twin
WARMUP_FRACTION = 0.02  # default warmup: 2% of the steps
MICRO_TOKENS = 8192  # default micro-batch: about this many tokens per device per forward/backward pass
ADJUSTABLE = ("lr", "warmup_steps", "steps")  # may change on --resume (a lower lr after a divergence)

# ------------------------------------------------------------------------------------------------
# 1. Command line
# ------------------------------------------------------------------------------------------------


class Interrupted(UserError):
    code = 130


class BadFlag(UserError):
    code = 2  # as argparse: a flag or a combination of flags that cannot work


def count(text):
    """A count of 1 or more written 2000000, 2e6 or 2M (suffixes k, M, B, T)."""
    scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1:], 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"must be a count of 1 or more like 2000000, 2e6 or 2M, not {text!r}")
    return int(value)


whole, positive = data.whole, data.positive  # whole(low): an int >= low; positive: a float > 0

# Config fields that have their own flag (or come from one), so --set does not take them
FLAG_FIELDS = {"model": "--model", "vocab_size": "--tokenizer", "seq_len": "--seq-len", "batch_size": "--batch-size",
               "micro_batch": "--micro-batch", "steps": "--steps", "warmup_steps": "--warmup", "lr": "--lr",
               "dtype": "--dtype", "attention": "--attention"}


def config_setting(text):
    """--set FIELD=VALUE -> (field, value), the value parsed by the Config field's type."""
    types = {f.name: f.type for f in dataclasses.fields(lv.Config) if f.name not in FLAG_FIELDS}
    valid = f"the fields --set takes are {', '.join(types)}"
    name, equals, value = text.partition("=")
    if name in FLAG_FIELDS:
        raise argparse.ArgumentTypeError(f"{name} has its own flag, {FLAG_FIELDS[name]}; use that")
    if not equals or name not in types:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE with a Config field; {valid}")
    kind = types[name]
    try:
        return name, ({"true": True, "false": False}[value.lower()] if kind is bool else kind(value))
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{name}={value!r}: {name} takes {kind.__name__} values; {valid}") from None


def parser():
    p = data.OneLineParser(description="Train Leviathan or its dense twin on streamed Pile shards.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--size", default="60M", choices=list(lv.SIZES), help="model preset")
    add("--model", default="leviathan", choices=lv.MODELS, help="Leviathan or its dense twin")
    add("--data", nargs="+", help="Pile-style .jsonl.zst/.jsonl shards, plain-text .txt/.md files (a file "
        "is one document), folders of them, globs or http(s) URLs (default: the uncopyrighted Pile)")
    add("--val-data", nargs="+", help="validation data, as --data (default: the Pile's val.jsonl.zst)")
    add("--tokenizer", default="o200k_base", help="a tiktoken encoding, or 'bytes'")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=whole(1), help=f"optimizer steps (default: {TOKENS_PER_PARAM} "
                        "tokens per parameter of the dense twin)")
    length.add_argument("--tokens", type=count, help="training tokens instead of --steps, e.g. 2B")
    add("--stop-after", type=whole(1), help="stop after this step, checkpointed; --resume goes on")
    add("--batch-size", type=whole(1), default=lv.Config.batch_size, help="sequences per optimizer step")
    add("--seq-len", type=whole(1), default=lv.Config.seq_len, help="tokens per sequence")
    add("--micro-batch", type=whole(1), help=f"sequences per pass, all devices together (default: about "
        f"{MICRO_TOKENS} tokens per device); gradients accumulate over the batch")
    add("--lr", type=positive, help="peak learning rate (default: the size's)")
    add("--warmup", type=whole(0), help=f"warmup steps (default: {WARMUP_FRACTION * 100:g}%% of the steps)")
    add("--seed", type=whole(0), default=0, help="seeds the model and the data order")
    add("--eval-every", type=whole(0), default=500, help="steps between evaluations, 0: at the end only")
    add("--eval-tokens", type=count, default=2_000_000, help="validation tokens, one sequence or more")
    add("--log-every", type=whole(1), default=10, help="steps between log lines")
    add("--ckpt-every", type=whole(1), default=1000, help="steps between checkpoints")
    add("--out", help="run folder (default: runs/<size>-<model>)")
    add("--resume", action="store_true", help="continue from <out>/ckpt.npz")
    add("--dtype", choices=lv.DTYPES, help="matmul dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    add("--attention", choices=lv.ATTENTION, help="attention kernel (cudnn: NVIDIA's fused kernel)")
    add("--set", type=config_setting, action="append", default=[], metavar="FIELD=VALUE",
        help="any other Config field, e.g. --set gen_knots=8 --set embed_norm=rms (repeatable)")
    add("--shuffle-buffer", type=whole(0), default=data.SHUFFLE_BUFFER, help="sequences shuffled, 0: none")
    add("--loader-threads", type=whole(1), default=max(1, min(8, (os.cpu_count() or 1) - 2)),
        help="tokenizer threads")
    many = p.add_argument_group("several processes (README: Many devices)")
    many.add_argument("--distributed", action="store_true", help="this is one process of several "
                      "(jax.distributed); on by itself when JAX_COORDINATOR_ADDRESS is set")
    many.add_argument("--coordinator", help="HOST:PORT where process 0 serves (default: $JAX_COORDINATOR_ADDRESS)")
    many.add_argument("--num-processes", type=whole(1), help="processes in all (default: $JAX_NUM_PROCESSES)")
    many.add_argument("--process-id", type=whole(0), help="this process, 0 .. n-1 (default: $JAX_PROCESS_ID)")
    many.add_argument("--data-shares", type=whole(1), help="parts the data is read in, one per process "
                      "(default: the process count); one process with --data-shares N trains on the "
                      "batches of an N-process run")
    many.add_argument("--join-timeout", type=positive, default=300.0,
                      help="seconds for every process to reach the coordinator at the start")
    many.add_argument("--peer-timeout", type=positive, default=20.0,
                      help="seconds without a heartbeat from another process before it counts as dead")
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
# 2. The run: its processes, config, data and state
# ------------------------------------------------------------------------------------------------

ROWS_KEPT = 64  # batches whose rows stay in the key-value store (processes stay within a few batches)


@dataclasses.dataclass
class Processes:
    """This process among the run's processes. With several (jax.distributed), each reads its share
    of the data and they swap their rows through the coordinator's key-value store, so that every
    process holds the same global batch; process 0 alone writes the run folder's files."""

    index: int = 0
    count: int = 1
    timeout: float = None  # seconds without a heartbeat after which another process counts as dead
    client: object = None  # jax.distributed's key-value store; None for one process
    address: str = None  # the coordinator's HOST:PORT
    closing: threading.Event = dataclasses.field(default_factory=threading.Event)  # the run has ended

    def gone(self, e):
        """End this process when the coordinator's key-value store fails (process 0 has stopped)."""
        leave(f"the coordinator at {self.address} stopped answering ({str(e).splitlines()[0][:80]}), so process 0 "
              "has probably stopped; the last good checkpoint is kept: rerun every process with --resume", 1)

    def watch(self):
        """Beat this process's heart in the key-value store every second, and end this process with one
        sentence when another's has not beaten for `timeout` seconds (it died, or its machine did).
        Waiting for a slow process (compiling, checkpointing) is not a failure; a silent heart is.
        jax.distributed has heartbeats of its own, but it ends a process with a stack trace: its
        timeout is set longer, so this one speaks first."""
        heard = {q: (None, time.monotonic()) for q in range(self.count) if q != self.index}
        beat = 0
        while not self.closing.wait(1.0):
            beat += 1
            try:
                self.client.key_value_set(f"alive/{self.index}", str(beat), allow_overwrite=True)
            except Exception as e:
                self.gone(e)
            for q, (last, since) in heard.items():
                if (now := self._try(f"alive/{q}")) != last:
                    heard[q] = (now, time.monotonic())
                elif time.monotonic() - since > self.timeout and not self.closing.is_set():
                    leave(f"process {q} has not been heard from for {self.timeout:g} s, so it has stopped "
                          "(or its machine has); the last good checkpoint is kept: fix it and rerun every "
                          "process with --resume", 1)

    def _try(self, key):
        """The value under `key`, or None while nobody has put it there; a failing store ends this process."""
        try:
            return self.client.key_value_try_get_bytes(key)
        except Exception as e:
            if "NOT_FOUND" in str(e):
                return None
            self.gone(e)

    def _get(self, key):
        """The value another process put under `key`, polled so that the loader thread can stop when
        the run ends. A process that never puts it has died: `watch` ends this one then."""
        pause = 0.001
        while not self.closing.is_set():
            if (value := self._try(key)) is not None:
                return value
            pause = min(2 * pause, 0.05)  # a few ms for a process in step, less load for a slow one
            time.sleep(pause)
        raise DataError("the run has ended")

    def share_rows(self, i, rows):
        """SharedStream's exchange: this process's rows of global batch i -> every process's rows."""
        (mine,) = rows.values()
        self.client.key_value_set_bytes(f"rows/{i}/{self.index}", mine.tobytes())
        everyone = {q: np.frombuffer(self._get(f"rows/{i}/{q}"), np.int32).reshape(mine.shape)
                    for q in range(self.count) if q != self.index}
        if i >= ROWS_KEPT:
            self.client.key_value_delete(f"rows/{i - ROWS_KEPT}/{self.index}")
        return {**everyone, self.index: mine}

    def any(self, key, flag):
        """True on every process when `flag` is true on any (each process's vote under `key`)."""
        if self.client is None:
            return flag
        self.client.key_value_set(f"{key}/{self.index}", str(int(flag)))
        return flag or any(self._get(f"{key}/{q}") == b"1" for q in range(self.count) if q != self.index)

    def barrier(self, name):
        """Wait until every process has reached `name`."""
        if self.client is not None:
            self.any(name, True)


def start_processes(args):
    """Processes(): one, or with --distributed (or JAX_COORDINATOR_ADDRESS) jax.distributed.initialize
    on the coordinator's address; the mesh then spans every device of every process."""
    env = os.environ.get
    address = args.coordinator or env("JAX_COORDINATOR_ADDRESS")
    if not (args.distributed or address):
        return Processes()
    try:
        count = args.num_processes or int(env("JAX_NUM_PROCESSES", 0)) or None
        index = args.process_id if args.process_id is not None else int(env("JAX_PROCESS_ID", -1))
    except ValueError:
        raise BadFlag("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be whole numbers") from None
    if address is None or count is None or not 0 <= index < count:
        raise BadFlag("--distributed needs --coordinator HOST:PORT, --num-processes N and a --process-id below N "
                      "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    # jax.distributed aborts the process with a stack trace when it cannot connect in time: a timer
    # that ends it first, with one sentence, is set a little earlier than its deadline
    failed = (f"the coordinator at {address} could not be reached, or not every one of the {count} processes "
              f"joined, within {args.join_timeout:g} s; start every process, check the address and its port, or "
              "raise --join-timeout")
    timer = threading.Timer(args.join_timeout, leave, (failed, 1))
    timer.start()
    try:
        jax.distributed.initialize(address, count, index, initialization_timeout=math.ceil(args.join_timeout) + 30,
                                   heartbeat_timeout_seconds=math.ceil(3 * args.peer_timeout) + 30)
    except Exception as e:
        raise UserError(f"{failed} ({type(e).__name__})") from None
    finally:
        timer.cancel()
    from jax._src import distributed  # the coordination service's key-value store that initialize opened
    procs = Processes(index, count, args.peer_timeout, distributed.global_state.client, address)
    threading.Thread(target=procs.watch, daemon=True).start()
    return procs


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
    try:
        dense_params = lv.count_params(lv.param_shapes(lv.config(args.size, "dense", vocab_size=vocab, seq_len=T,
                                                                 **settings)))
    except ValueError as e:
        raise BadFlag(f"--set: {e}") from None
    steps = args.steps or math.ceil((args.tokens or TOKENS_PER_PARAM * dense_params) / (B * T))
    warmup = args.warmup if args.warmup is not None else round(WARMUP_FRACTION * steps)
    overrides = dict(vocab_size=vocab, seq_len=T, batch_size=B, micro_batch=micro, steps=steps,
                     warmup_steps=warmup, **settings)
    given = {"lr": args.lr, "dtype": args.dtype, "attention": args.attention}
    overrides.update({key: value for key, value in given.items() if value is not None})
    return lv.config(args.size, args.model, **overrides), dense_params


def make_stream(args, enc, sources, procs=None):
    """The training stream of a command line: data, tokenizer, seed, batch shape and data shares (the
    process count); never --model. One share: a BatchStream; several: a SharedStream, of which each
    process reads its own share (or one process all of them, with --data-shares)."""
    procs = procs or Processes()
    shares = args.data_shares or procs.count
    common = dict(seed=args.seed, shuffle_buffer=args.shuffle_buffer, vocab_size=lv.padded_vocab(enc),
                  threads=args.loader_threads)
    if shares == 1 and procs.count == 1:
        return data.BatchStream(sources, enc, args.seq_len, args.batch_size, **common)
    if procs.count > 1 and shares != procs.count:
        raise BadFlag(f"--data-shares {shares} differs from the {procs.count} processes; leave it out")
    if procs.count > 1:
        return data.SharedStream(sources, enc, args.seq_len, args.batch_size, shares, [procs.index],
                                 procs.share_rows, **common)
    return data.SharedStream(sources, enc, args.seq_len, args.batch_size, shares, range(shares), **common)


def changed_settings(old, new):
    """The run settings that differ between a checkpoint and this command, ADJUSTABLE aside."""
    changed = [key for key in new if key != "config" and old.get(key) != new[key]]
    old_config = {**dataclasses.asdict(lv.Config()), **old["config"]}  # a field added since: its default
    return changed + [key for key in new["config"]
                      if key not in ADJUSTABLE and old_config.get(key) != new["config"][key]]


@dataclasses.dataclass
class Run:
    """What a training run is made of (built by `setup`) and what it tracks as it goes."""

    cfg: lv.Config
    mesh: jax.sharding.Mesh
    out: str  # the run folder
    settings: dict  # what decides the run's numbers: a resumed run must agree on it
    every: dict  # steps between "log", "eval" (0: at the end only) and "checkpoint"
    stop_at: int  # the last step this invocation runs: cfg.steps, or --stop-after
    start: int  # the step it starts from (the checkpoint's, on --resume)
    val: dict  # validation batches (data.load_validation)
    loader: data.Loader
    first: tuple  # the first (batch, data state), read before compiling: a bad shard fails early
    state: dict = None  # the train state
    last_saved: int = None  # step of the last checkpoint written by or before this invocation
    signal: int = None  # a Ctrl-C or SIGTERM that arrived
    data_failed: bool = False  # the loader met an error: checkpoint what was trained
    started: float = None  # time.perf_counter() when training started
    clock: tuple = None  # (time, step) of the last log line: tokens/s are measured since then
    procs: Processes = dataclasses.field(default_factory=Processes)
    stops: dict = dataclasses.field(default_factory=dict)  # step -> whether the processes agreed to stop

    ckpt = property(lambda self: os.path.join(self.out, "ckpt.npz"))  # to resume: state and data position
    params = property(lambda self: os.path.join(self.out, "params.npz"))  # lv.load_params: to sample
    writes = property(lambda self: self.procs.index == 0)  # process 0 alone writes the run folder's files

    def data_file(self, step, index=None):
        """Where a process's data position at `step` goes when the data is read in shares."""
        return os.path.join(self.out, f"data-{step}-p{self.procs.index if index is None else index}.npz")
    log = property(lambda self: os.path.join(self.out, "log.jsonl"))


def checkpoint_to_resume(args, ckpt, settings, stream, procs):
    """(step, state leaves) of the checkpoint --resume continues, its data position loaded into the
    stream (with shares: from this process's data file beside it); (0, None) for a new run. Refuses a
    run folder that holds a run without --resume."""
    if not args.resume:
        if os.path.exists(ckpt):
            raise UserError(f"{os.path.dirname(ckpt)} already holds a run ({ckpt}); add --resume to "
                            "continue it or choose another --out")
        return 0, None
    if not os.path.exists(ckpt):
        raise UserError(f"--resume found no checkpoint {ckpt}; run without --resume to start afresh")
    meta, leaves, data_state = load_checkpoint(ckpt)
    if meta["run"].get("data_shares", 1) != settings.get("data_shares", 1):
        raise UserError(f"--resume: the checkpoint was made by {meta['run'].get('data_shares', 1)} process(es) "
                        f"(data shares), this run has {settings.get('data_shares', 1)}; resume with as many")
    if changed := changed_settings(meta["run"], settings):
        raise UserError(f"--resume: {', '.join(changed)} differ from the checkpointed run; rerun with "
                        "its original flags or choose a new --out")
    if isinstance(stream, data.SharedStream):
        data_state["shares"] = load_data_file(os.path.join(os.path.dirname(ckpt),
                                                           f"data-{meta['step']}-p{procs.index}.npz"))
    stream.load_state(data_state)
    return meta["step"], leaves


def setup(args):
    """A Run, checked in an order that fails fast: flags, checkpoint, validation data, first training
    batch; only then the model. Writes config.json, and trims log.jsonl on --resume."""
    procs = start_processes(args)
    enc = data.tokenizer(args.tokenizer)
    sources = data.resolve_sources(args.data or data.DEFAULT_DATA, "--data")
    val_sources = data.resolve_sources(args.val_data or data.DEFAULT_VAL, "--val-data")
    mesh = lv.make_mesh()
    cfg, dense_params = build_config(args, enc, mesh.size)
    out = args.out or os.path.join("runs", f"{args.size}-{args.model}")
    settings = {"config": dataclasses.asdict(cfg), "data": sources, "val_data": val_sources,
                "tokenizer": enc.name, "seed": args.seed, "shuffle_buffer": args.shuffle_buffer,
                "eval_tokens": args.eval_tokens}
    stream = make_stream(args, enc, sources, procs)
    if isinstance(stream, data.SharedStream):
        settings["data_shares"] = stream.n
    start, leaves = checkpoint_to_resume(args, os.path.join(out, "ckpt.npz"), settings, stream, procs)
    val = data.load_validation(val_sources, enc, cfg.seq_len, args.eval_tokens, cfg.micro_batch, mesh.size)
    loader = data.Loader(stream, mesh.size)
    every = {"log": args.log_every, "eval": args.eval_every, "checkpoint": args.ckpt_every}
    run = Run(cfg, mesh, out, settings, every, min(args.stop_after or cfg.steps, cfg.steps), start, val, loader,
              first=next(loader), last_saved=start if args.resume else None, procs=procs)
    run.state = lv.init_state(jax.random.key(args.seed), cfg, mesh)
    if leaves is not None:
        run.state = restore_state(run.state, leaves)
    write_config(run, args, enc, settings, dense_params)
    return run


def write_config(run, args, enc, settings, dense_params):
    """config.json (README: "Run folder format"), a fresh or trimmed log.jsonl, and a first line."""
    params, cfg = run.state["params"], run.cfg
    config = {"model": args.model, "size": args.size, "seed": args.seed, "n_params": lv.count_params(params),
              "n_params_embedding": lv.count_params(params[lv.EMBEDDING_PARAMS[args.model]]),
              "n_params_dense_twin": dense_params, "steps": cfg.steps,
              "tokens_per_step": cfg.batch_size * cfg.seq_len,
              "val_tokens": run.val["tokens"], "val_bytes": run.val["bytes"], "eot_token": enc.eot_token,
              "eval_every": args.eval_every, "log_every": args.log_every, "ckpt_every": args.ckpt_every,
              "n_devices": run.mesh.size, "device_kind": jax.devices()[0].device_kind, "command": sys.argv,
              "set": dict(args.set),
              **settings}
    config["n_processes"] = run.procs.count
    if run.writes:
        os.makedirs(run.out, exist_ok=True)
        write_atomically(os.path.join(run.out, "config.json"), json.dumps(config, indent=1).encode())
        truncate_log(run.log, run.start) if args.resume else open(run.log, "w").close()
    print(f"{args.model} {args.size}: {config['n_params']:,} parameters, {cfg.steps:,} steps of "
          f"{cfg.batch_size} x {cfg.seq_len} tokens, micro-batch {cfg.micro_batch}, {run.mesh.size} "
          f"device(s), {f'resuming at step {run.start}' if args.resume else 'from scratch'} -> {run.out}")


# ------------------------------------------------------------------------------------------------
# 3. Evaluation
# ------------------------------------------------------------------------------------------------


def evaluate(eval_step, params, val, counts, mesh):
    """Loss on the fixed validation batches, bucketed by the training token counts so far, by target
    token and by input token."""
    outputs = [eval_step(params, lv.shard_batch(batch, mesh)) for batch in val["batches"]]  # (rows, T)
    losses = np.concatenate([np.asarray(out) for out in outputs])
    targets = np.concatenate([batch["targets"] for batch in val["batches"]])
    inputs = np.concatenate([batch["ids"][batch["inverse"]] for batch in val["batches"]])  # (rows, T)
    return data.loss_summary(losses, targets, data.frequency_buckets(counts), val["bytes"], inputs)


# ------------------------------------------------------------------------------------------------
# 4. Checkpoints and logs
# ------------------------------------------------------------------------------------------------


def write_atomically(path, contents):
    """Write bytes (or call contents(file)) into path + '.tmp', sync it, rename: `path` is always whole."""
    with open(path + ".tmp", "wb") as f:
        contents(f) if callable(contents) else f.write(contents)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def stream_arrays(state, prefix):
    """A stream's state -> (its arrays: <prefix>_counts, and _pending and _buffer for a BatchStream's,
    the JSON-able rest). A SharedStream's "shares" go to the data files instead."""
    arrays = {f"{prefix}_counts": state["counts"]}
    if "buffer" in state:
        buffer = state["buffer"]
        arrays.update({f"{prefix}_pending": state["pending"],
                       f"{prefix}_buffer": np.stack(buffer) if buffer else np.zeros((0, 0), np.int32)})
    return arrays, {k: v for k, v in state.items() if k not in ("pending", "buffer", "counts", "shares")}


def stream_state(f, prefix, rest):
    """The inverse of stream_arrays, from an open .npz."""
    state = {**rest, "counts": f[f"{prefix}_counts"]}
    if f"{prefix}_buffer" in f.files:
        state.update(pending=f[f"{prefix}_pending"], buffer=list(f[f"{prefix}_buffer"]))
    return state


def save_checkpoint(path, train_state, data_state, meta):
    """One .npz: state_0 ... (the leaves of the train state: params, optimizer state, step, all
    float32 or int32), data_counts (and data_pending, data_buffer), and meta (JSON: step, run
    settings, data position)."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(train_state))]
    arrays = {f"state_{i}": x for i, x in enumerate(leaves)}
    stream, position = stream_arrays(data_state, "data")
    arrays.update(stream, meta=np.array(json.dumps({**meta, "n_leaves": len(leaves), "data": position})))
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """-> (meta, leaves, data_state) of a checkpoint written by save_checkpoint."""
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            leaves = [f[f"state_{i}"] for i in range(meta["n_leaves"])]
            data_state = stream_state(f, "data", meta.pop("data"))
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); restore it or start a new --out") from None
    return meta, leaves, data_state


def save_data_file(path, shares):
    """A process's data position when the data is read in shares: {share: BatchStream state}."""
    arrays, positions = {}, {}
    for p, state in shares.items():
        stream, positions[p] = stream_arrays(state, f"share{p}")
        arrays.update(stream)
    write_atomically(path, lambda f: np.savez(f, meta=np.array(json.dumps(positions)), **arrays))


def load_data_file(path):
    try:
        with np.load(path) as f:
            return {int(p): stream_state(f, f"share{p}", rest) for p, rest in json.loads(str(f["meta"])).items()}
    except Exception as e:
        raise UserError(f"this process's data position {path} cannot be read ({type(e).__name__}); resume with "
                        "the same processes and an --out every process reads (a shared filesystem)") from None


def save_all(run, step, state, data_state):
    """Checkpoint the state after `step`. With data shares every process first writes its data file
    of that step, and all wait for each other; then process 0 writes ckpt.npz (which names the step,
    so an interrupted save leaves the previous checkpoint and its data files whole) and params.npz;
    then the processes drop their older data files."""
    if "shares" in data_state:
        save_data_file(run.data_file(step), data_state["shares"])
        run.procs.barrier(f"checkpoint/{step}")
    if run.writes:
        save_checkpoint(run.ckpt, state, data_state, {"step": step, "run": run.settings})
        lv.save_params(run.params, state["params"], run.cfg, step=step, tokenizer=run.settings["tokenizer"])
        print(f"checkpoint: step {step} -> {run.ckpt} (parameters alone: {run.params})", flush=True)
    if "shares" in data_state:
        run.procs.barrier(f"saved/{step}")
        for old in glob.glob(run.data_file("*")):
            if old != run.data_file(step):
                os.remove(old)
    run.last_saved = step


def restore_state(fresh, leaves):
    """A freshly initialised train state holding the checkpoint's values, placed like the fresh one."""
    ref, treedef = jax.tree_util.tree_flatten(fresh)
    if [(r.shape, r.dtype) for r in ref] != [(x.shape, x.dtype) for x in leaves]:
        raise UserError("the checkpoint's arrays do not fit this model; resume with the original flags")
    return jax.tree_util.tree_unflatten(treedef, [jax.device_put(x, r.sharding) for x, r in zip(leaves, ref)])


@jax.jit
def all_finite(tree):
    """True when no array of the pytree holds a NaN or an infinity."""
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]).all()


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Keep the log lines up to `step` (a resumed run writes the later steps again). A line is
    written whole with its newline, so one without a newline was cut short by a kill: it goes too."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        write_atomically(path, "".join(kept).encode())


def duration(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def console_line(r, steps, eta):
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    line = (f"step {r['step']}/{steps} | loss {r['train_loss']:.4f} | lr {r['lr']:.2e} | grad norm "
            f"{r['grad_norm']:.3f} | {r['tok_per_s']:,.0f} tok/s | MFU {mfu} | data {r['data_hash'][:8]} | "
            f"ETA {duration(eta)}")
    if "val_loss" in r:
        bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "n/a"
        line += f"\n  eval: val loss {r['val_loss']:.4f} nats/token, {bpb} bits/byte"
    return line


# ------------------------------------------------------------------------------------------------
# 5. Training
# ------------------------------------------------------------------------------------------------

NEEDS_STATE = {"eval", "checkpoint", "stop"}  # actions that need the train state itself


def actions(run, step):
    """What happens after `step`, decided here and nowhere else: a subset of
    {"log", "eval", "checkpoint", "stop"}. lv.train_loop hands over the state where one needs it."""
    every, todo = run.every, set()
    if step in (run.start + 1, run.stop_at) or step % every["log"] == 0:
        todo.add("log")
    if step == run.cfg.steps or (every["eval"] and step % every["eval"] == 0):
        todo |= {"log", "eval"}
    if step == run.stop_at or step % every["checkpoint"] == 0:
        todo.add("checkpoint")
    if signalled(run, step):
        todo |= {"checkpoint", "stop"}
    return todo


def signalled(run, step):
    """Whether the run stops after `step` for a signal (Ctrl-C, SIGTERM). Several processes vote once
    per step through the key-value store, so that a signal to any stops them all at the same step."""
    if step not in run.stops:
        run.stops = {s: stop for s, stop in run.stops.items() if s > step - 4}
        run.stops[step] = run.procs.any(f"stop/{step}", run.signal is not None)
    return run.stops[step]


def log_step(run, step, metrics, state, data_state, n_ids, with_eval):
    """Append the step's line to log.jsonl (with an evaluation if with_eval) and print it."""
    now, (then, then_step) = time.perf_counter(), run.clock
    cfg, tokens_per_step = run.cfg, run.cfg.batch_size * run.cfg.seq_len
    record = {"step": step, "tokens": step * tokens_per_step, "epoch": data_state["epoch"],
              "train_loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
              "tok_per_s": (step - then_step) * tokens_per_step / (now - then), "mfu": None,
              "elapsed_s": now - run.started, "data_hash": data_state["data_hash"],
              "bad_lines": data_state["bad_lines"]}
    if peak := lv.peak_flops():
        flops = lv.flops_per_step(cfg, tokens_per_step, n_ids)
        record["mfu"] = flops * record["tok_per_s"] / tokens_per_step / (peak * run.mesh.size)
    if with_eval:
        eval_step = lv.make_eval_step(cfg, run.mesh)
        record.update(evaluate(eval_step, state["params"], run.val, data_state["counts"], run.mesh),
                      documents=data_state["documents"])
    if run.writes:
        append_log(run.log, record)
    eta = (now - run.started) / (step - run.start) * (run.stop_at - step)
    where = f"[process {run.procs.index}] " if run.procs.count > 1 else ""
    print(where + console_line(record, cfg.steps, eta), flush=True)
    run.clock = time.perf_counter(), step  # an evaluation's time does not count as training


def kept(run):
    if run.last_saved is None:
        return "no checkpoint had been saved yet; lower --lr and start again"
    return f"the last good checkpoint (step {run.last_saved}) is kept: lower --lr and resume from it"


def on_step(run, step, metrics, state, info):
    """lv.train_loop's callback: stop on divergence, then log, evaluate, checkpoint, stop, as due."""
    data_state, n_ids = info
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        raise UserError(f"training diverged by step {step} (loss {metrics['loss']}, grad norm "
                        f"{metrics['grad_norm']}), so nothing more was saved; {kept(run)}")
    todo = actions(run, step)
    if "log" in todo:
        log_step(run, step, metrics, state, data_state, n_ids, with_eval="eval" in todo)
    if state is None:
        return
    if "checkpoint" in todo or run.data_failed:
        if not bool(all_finite(state)):
            raise UserError(f"the state after step {step} is not finite, so it was not saved; {kept(run)}")
        save_all(run, step, state, data_state)
    if "stop" in todo:
        raise Interrupted(f"stopped by signal {run.signal} after step {step}, " + (
            "the last: the run is complete and saved" if step == run.cfg.steps else
            "which is checkpointed; rerun the same command with --resume to continue"))


def batches(run):
    """(host batch, (data state after it, distinct ids in it)) for lv.train_loop."""
    batch, data_state = run.first
    while True:
        yield batch, (data_state, int(batch["inverse"].max()) + 1)  # ids before padding
        try:
            batch, data_state = next(run.loader)
        except DataError:
            run.data_failed = True
            raise


def train(args):
    run = setup(args)
    handlers = {s: signal.signal(s, lambda signum, frame: setattr(run, "signal", signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    run.started = time.perf_counter()
    run.clock = run.started, run.start
    try:
        lv.train_loop(run.state, batches(run), lv.make_train_step(run.cfg, run.mesh), run.stop_at - run.start,
                      on_step=lambda *a: on_step(run, *a), mesh=run.mesh,
                      wants_state=lambda step: bool(actions(run, step) & NEEDS_STATE))
    finally:
        run.procs.closing.set()
        run.loader.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    tokens = run.stop_at * run.cfg.batch_size * run.cfg.seq_len
    more = "" if run.stop_at == run.cfg.steps else "; --resume continues"
    print(f"done: {run.stop_at} of {run.cfg.steps} steps, {tokens:,} tokens -> {run.out}{more}")
    return 0


def leave(message, code):
    """End a process of a multi-process run at once with one sentence: waiting for the others to
    shut down (jax.distributed does at exit) could take minutes when one of them has died."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def main(argv=None):
    args = parse_args(argv)
    several = args.distributed or args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    try:
        return train(args)
    except UserError as e:
        if several:
            leave(e, e.code)
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except jax.errors.JaxRuntimeError as e:
        if not several:
            raise
        leave(f"a collective between the processes failed ({str(e).splitlines()[0][:120]}), so one has "
              "probably stopped; the last good checkpoint is kept: rerun every process with --resume", 1)
    except KeyboardInterrupt:
        print("error: interrupted before training started; there was nothing to save.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
