"""machinery/processes.py: two processes on 127.0.0.1 train like one process with two devices,
resume after kill -9, and end with one sentence when the other dies."""

import os
import re
import signal
import threading
import time

import pytest

from conftest import RUN, free_port, read_log, start, wait_for_step
from machinery import run_folder
from machinery.processes import Peers



class Store:
    """A key-value store as jax.distributed's client shows it: a missing key is NOT_FOUND."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.values[key] = value.encode()

    def key_value_try_get_bytes(self, key):
        if key not in self.values:
            raise KeyError(f"NOT_FOUND: {key}")
        return self.values[key]


def test_a_barrier_waits_for_every_process_and_a_vote_reads_every_vote():
    store = Store()
    first = Peers(index=0, count=2, client=store)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (first.barrier("saved/4"), done.set()), daemon=True)
    waiter.start()
    assert not done.wait(0.3)  # process 1 has not reached the barrier: process 0 waits
    store.key_value_set("saved/4/1", "1")
    assert done.wait(5)
    second = Peers(index=1, count=2, client=store)
    store.key_value_set("stop/7/0", "0")
    assert second.vote("stop/7", True) is True and first.vote("stop/7", False) is True  # one true: all stop
    store.key_value_set("stop/8/1", "0")
    assert first.vote("stop/8", False) is False

# --- several processes: jax.distributed on 127.0.0.1, one CPU device each ----------------------------

DIST = [*RUN[:RUN.index("--steps")], "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--shuffle-buffer",
        "64", "--eval-every", "3", "--eval-tokens", "512", "--log-every", "1", "--ckpt-every", "2", "--lr", "3e-3"]


@pytest.fixture
def spawned():
    """The processes a test starts; any still running at its end (a failed test) are killed."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_processes(spawned, out, env, port, extra=(), ids=(0, 1)):
    flags = ["--out", out, "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             *extra]
    procs = [start([*DIST, *flags, "--process-id", str(i)], env) for i in ids]
    spawned += procs
    return procs


def finish(procs, timeout=900):
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs
    return [stdout for stdout, _ in outputs]


def printed_hashes(stdout):
    return re.findall(r"step (\d+)/\d+ .*\| data (\w+) \|", stdout)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices_and_resume_after_kill_9(tmp_path, env, spawned, o200k):
    out = str(tmp_path / "two")
    stdouts = finish(start_processes(spawned, out, env, free_port()))
    assert len(printed_hashes(stdouts[0])) == 6 and printed_hashes(stdouts[0]) == printed_hashes(stdouts[1])
    two = read_log(out)
    assert [r["step"] for r in two] == list(range(1, 7)) and sorted(os.listdir(out)) == [
        "ckpt.npz", "config.json", "data-6-p0.npz", "data-6-p1.npz", "log.jsonl", "params.npz"]

    one_out = str(tmp_path / "one")  # one process, two devices, reading both shares itself
    proc = start([*DIST, "--out", one_out, "--data-shares", "2"],
                 {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    spawned.append(proc)
    finish([proc])
    for a, b in zip(read_log(one_out), two, strict=True):
        assert a["data_hash"] == b["data_hash"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), rel=1e-6)

    killed = str(tmp_path / "killed")  # kill -9 both after step 3, then resume both
    procs = start_processes(spawned, killed, env, free_port())
    wait_for_step(procs[0], killed, 3, timeout=600)
    for proc in procs:
        proc.kill()
        proc.wait()
    finish(start_processes(spawned, killed, env, free_port(), extra=["--resume"]))
    resumed = read_log(killed)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, two):
        assert a["data_hash"] == b["data_hash"] and a["train_loss"] == b["train_loss"]
        assert a.get("val_loss") == b.get("val_loss")


@pytest.mark.slow
@pytest.mark.parametrize("victim,how", [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)])
def test_when_one_process_dies_the_other_ends_with_one_sentence(tmp_path, env, spawned, victim, how, o200k):
    """SIGKILL: its sockets close, and a collective fails at once. SIGSTOP (a machine that froze):
    a collective with it waits forever, and only the missing heartbeat ends the survivor. Process 0
    hosts jax.distributed's coordination service: when it dies, JAX itself ends the others at once,
    with its own message and a stack trace (README: a known limit), so only the time is checked."""
    out = str(tmp_path / "run")
    procs = start_processes(spawned, out, env, free_port(), extra=["--steps", "400", "--eval-every", "0",
                                                                   "--peer-timeout", "10"])
    wait_for_step(procs[0], out, 3, timeout=600)  # step 2's checkpoint is written before step 3 is logged
    saved = run_folder.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"]
    procs[victim].send_signal(how)
    t0 = time.time()
    survivor = procs[1 - victim]
    _, stderr = survivor.communicate(timeout=120)
    seconds = time.time() - t0
    assert survivor.returncode != 0 and seconds < 60, (seconds, stderr)
    assert run_folder.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"] >= saved  # a whole checkpoint
    print(f"the survivor ended {seconds:.1f} s after the signal")
    if victim != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert survivor.returncode == 1 and stderr.strip() == errors[0], stderr
        assert "rerun every process with --resume" in errors[0]


@pytest.mark.slow
def test_an_unreachable_coordinator_is_named_in_one_sentence(tmp_path, env, spawned):
    port = free_port()
    (proc,) = start_processes(spawned, str(tmp_path / "run"), env, port, extra=["--join-timeout", "3"], ids=(1,))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"the coordinator at 127.0.0.1:{port} could not be reached" in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [stderr.strip().splitlines()[-1]]
    assert not os.path.exists(tmp_path / "run")
