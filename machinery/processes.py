"""Machinery a learner may skip: the run's processes. Signals (Ctrl-C, SIGTERM), and for
`train.py --distributed` the other processes: joining, heartbeats, votes, and each step's rows.

    Signals           the first: stop after the step in progress, saved; a second: stop now
    join(args)        -> Peers: this process, alone or among several (jax.distributed)
    Peers.gather      every process's rows of a batch, through a JAX collective
    Peers.vote        true on every process when true on any (a signal to one stops them all)
    Shares            the shares of the data that this process reads
"""

import dataclasses
import math
import os
import signal
import threading
import time

import jax
import numpy as np

import data
from machinery.cli import BadFlag, UserError, exit_now, number


class Stopped(UserError):
    """A run stopped by a signal, after a step that was saved."""

    code = 130  # as a shell reports Ctrl-C


class Signals:
    """Ctrl-C and SIGTERM while training. The first is answered at once: the run stops after the step
    in progress and saves it. A second stops the run now; the last checkpoint, always written whole,
    is kept. Python runs a signal handler only when the main thread runs Python, and it may be waiting
    minutes for a long step: so a thread reading signal.set_wakeup_fd answers instead."""

    def __init__(self, last_saved):
        self.received, self.last_saved = None, last_saved  # last_saved(): step of the last checkpoint
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.handlers = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
        self.wakeup = signal.set_wakeup_fd(write_fd)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while data := os.read(self.read_fd, 1):
            if data[0] not in self.handlers:
                continue
            name, step = signal.Signals(data[0]).name, self.last_saved()
            kept = "no checkpoint had been saved yet" if step is None else f"the checkpoint of step {step} is kept"
            if self.received is not None:
                exit_now(f"stopped at once by a second {name}; {kept}: rerun with --resume to continue from it", 130)
            self.received = data[0]
            print(f"{name}: the run stops after the step in progress and saves it ({name} again stops it "
                  f"now; {kept})", flush=True)
        os.close(self.read_fd)  # close() closed the other end

    def close(self):
        os.close(signal.set_wakeup_fd(self.wakeup))
        for s, handler in self.handlers.items():
            signal.signal(s, handler)


def add_flags(parser):
    """The command line of several processes (README: Many devices)."""
    many = parser.add_argument_group("several processes (README: Many devices)")
    many.add_argument("--distributed", action="store_true", help="this is one process of several "
                      "(jax.distributed); on by itself when JAX_COORDINATOR_ADDRESS is set")
    many.add_argument("--coordinator", help="HOST:PORT where process 0 serves (default: $JAX_COORDINATOR_ADDRESS)")
    many.add_argument("--num-processes", type=number(1), help="processes in all (default: $JAX_NUM_PROCESSES)")
    many.add_argument("--process-id", type=number(0), help="this process, 0 .. n-1 (default: $JAX_PROCESS_ID)")
    many.add_argument("--data-shares", type=number(1), help="parts the data is read in, one per process "
                      "(default: the process count); one process with --data-shares N trains on the "
                      "batches of an N-process run")
    many.add_argument("--join-timeout", type=number(0, whole=False, strict=True), default=300.0,
                      help="seconds for every process to reach the coordinator at the start")
    many.add_argument("--peer-timeout", type=number(0, whole=False, strict=True), default=20.0,
                      help="seconds without a heartbeat from another process before it counts as dead")


def several(args):
    """Whether this command line is one process of several."""
    return bool(args.distributed or args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"))


@dataclasses.dataclass
class Peers:
    """This process among the run's processes: one, or several joined by jax.distributed. The batch's
    rows travel through a JAX collective; the coordinator's key-value store carries only small control
    messages (heartbeats, votes). Process 0 alone writes the run folder's files."""

    index: int = 0
    count: int = 1
    timeout: float = None  # seconds without a heartbeat after which another process counts as dead
    client: object = None  # jax.distributed's key-value store; None for one process
    address: str = None  # the coordinator's HOST:PORT
    closing: threading.Event = dataclasses.field(default_factory=threading.Event)  # the run has ended

    def gather(self, rows):
        """This process's rows of a batch (b, T+1) -> every process's (count * b, T+1), in process order.
        Called from the main thread only, so that it never interleaves with the train step's collectives."""
        if self.count == 1:
            return rows
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(rows, tiled=True))

    def vote(self, key, flag):
        """True on every process when `flag` is true on any (each process's vote under `key`)."""
        if self.client is None:
            return flag
        self.client.key_value_set(f"{key}/{self.index}", str(int(flag)))
        # every other vote is read, even when this one is true: so a vote is also a barrier
        others = [self._get(f"{key}/{q}") for q in range(self.count) if q != self.index]
        return flag or b"1" in others

    def barrier(self, name):
        """Wait until every process has reached `name`."""
        self.vote(name, True)

    def watch(self):
        """Beat this process's heart in the key-value store every second, and end this process with one
        sentence when another's has not beaten for `timeout` seconds (it died, or its machine did).
        A slow process (compiling, checkpointing) still beats. jax.distributed has heartbeats of its
        own, but it ends a process with a stack trace: its timeout is set longer, so this one speaks first."""
        heard = {q: (None, time.monotonic()) for q in range(self.count) if q != self.index}
        beat = 0
        while not self.closing.wait(1.0):
            beat += 1
            try:
                self.client.key_value_set(f"alive/{self.index}", str(beat), allow_overwrite=True)
            except Exception as e:  # noqa: BLE001 -- the store itself has gone
                self._gone(e)
            for q, (last, since) in heard.items():
                if (now := self._try(f"alive/{q}")) != last:
                    heard[q] = (now, time.monotonic())
                elif time.monotonic() - since > self.timeout and not self.closing.is_set():
                    exit_now(f"process {q} has not been heard from for {self.timeout:g} s, so it has stopped "
                             "(or its machine has); the last good checkpoint is kept: fix it and rerun every "
                             "process with --resume", 1)

    def _gone(self, e):
        exit_now(f"the coordinator at {self.address} stopped answering ({str(e).splitlines()[0][:80]}), so "
                 "process 0 has probably stopped; the last good checkpoint is kept: rerun every process with --resume", 1)

    def _try(self, key):
        """The value under `key`, or None while nobody has put it there; a failing store ends this process."""
        try:
            return self.client.key_value_try_get_bytes(key)
        except Exception as e:  # noqa: BLE001
            if "NOT_FOUND" in str(e):
                return None
            self._gone(e)

    def _get(self, key):
        """The value another process put under `key`. A process that never puts it has died: `watch`
        ends this one then."""
        pause = 0.001
        while (value := self._try(key)) is None:
            pause = min(2 * pause, 0.05)  # a few ms for a process in step, less load for a slow one
            time.sleep(pause)
        return value


class Shares:
    """Several shares of the data read by one process: share p of n fills rows [p B/n, (p+1) B/n) of
    every batch (`data.BatchStream(share=(p, n))`, each with its own seeded buffer). The process of a run
    over n processes reads one share; one process with --data-shares n reads all n, and trains on the
    batches of the n-process run. Nothing here depends on the model."""

    def __init__(self, sources, enc, seq_len, batch_size, n, local, seed=0, shuffle_buffer=data.SHUFFLE_BUFFER,
                 threads=1):
        if batch_size % n:
            raise UserError(f"--batch-size {batch_size} does not split into {n} equal shares, one per process; "
                            f"give a multiple of {n}")
        self.n = n
        self.shares = {p: data.BatchStream(sources, enc, seq_len, batch_size // n, seed, shuffle_buffer,
                                      threads=threads, share=(p, n)) for p in local}

    @classmethod
    def of(cls, args, enc, sources, peers):
        """The shares of train.py's command line: --data-shares (default: one per process); a process of
        several reads its own, one process reads them all."""
        shares = args.data_shares or peers.count
        if peers.count > 1 and shares != peers.count:
            raise BadFlag(f"--data-shares {shares} differs from the {peers.count} processes; leave it out")
        local = [peers.index] if peers.count > 1 else range(shares)
        return cls(sources, enc, args.seq_len, args.batch_size, shares, local, args.seed, args.shuffle_buffer,
                   threads=args.loader_threads)

    def next_batch(self):
        """This process's rows of the next batch: its shares' rows in share order."""
        return np.concatenate([stream.next_batch() for stream in self.shares.values()])

    def state(self):
        """Each share's BatchStream state under "shares", and a summary for the log."""
        local = {p: stream.state() for p, stream in self.shares.items()}
        documents = {}
        for s in local.values():
            documents.update({k: documents.get(k, 0) + v for k, v in s["documents"].items()})
        return {"epoch": max(s["epoch"] for s in local.values()), "documents": documents,
                "bad_lines": sum(s["bad_lines"] for s in local.values()),
                "shares": {str(p): s for p, s in local.items()}}  # str: JSON's keys, in a checkpoint

    def load_state(self, state):
        for p, stream in self.shares.items():
            stream.load_state(state["shares"][str(p)])


def join(args):
    """Peers(): one process, or with --distributed (or JAX_COORDINATOR_ADDRESS) jax.distributed.initialize
    on the coordinator's address; the mesh then spans every device of every process."""
    if not several(args):
        return Peers()
    env = os.environ.get
    address = args.coordinator or env("JAX_COORDINATOR_ADDRESS")
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
    timer = threading.Timer(args.join_timeout, exit_now, (failed, 1))
    timer.start()
    try:
        jax.distributed.initialize(address, count, index, initialization_timeout=math.ceil(args.join_timeout) + 30,
                                   heartbeat_timeout_seconds=math.ceil(3 * args.peer_timeout) + 30)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{failed} ({type(e).__name__})") from None
    finally:
        timer.cancel()
    from jax._src import distributed  # the coordination service's key-value store that initialize opened

    peers = Peers(index, count, args.peer_timeout, distributed.global_state.client, address)
    threading.Thread(target=peers.watch, daemon=True).start()
    return peers
