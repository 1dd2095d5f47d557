"""What every test file shares: the environment (CPU, two devices, the compilation cache), the
bundled corpus, tokenizer checks that skip with their reason, small data, a local HTTP server, and
helpers that start train.py as a user would.

Run: python -m pytest -q          (the fast inner loop: python -m pytest -q -m "not slow")
"""

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

# Two CPU devices for the data-parallel tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zstandard  # noqa: E402

import leviathan as lv  # noqa: E402
from machinery import cli  # noqa: E402

cli.use_compile_cache()  # as the scripts do: a second run of the suite compiles (almost) nothing

HERE = os.path.dirname(os.path.abspath(__file__))
MINIPILE = os.path.join("corpus", "minipile")  # the bundled corpus, relative to the repository root
BYTES = lv.byte_encoding()  # token id = byte value, EOT = 256: easy to read in assertions
EOT = 256


@functools.cache
def encoding_problem(name):
    """None where tiktoken can load the encoding `name` (from its cache, or by downloading it), else why not."""
    import tiktoken

    try:
        tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 -- any failure means the same: no tokenizer file here
        return (f"needs tiktoken's {name}, which is neither in its cache nor downloadable here "
                f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder holding it")
    return None


def skip_without(*names):
    """Skip the calling test, with its one-line reason, where a tokenizer file it needs cannot be had."""
    for name in names:
        if problem := encoding_problem(name):
            pytest.skip(problem)


def tiktoken_cache_dir():
    """The folder tiktoken keeps its downloaded files in, in tiktoken's own order: TIKTOKEN_CACHE_DIR,
    DATA_GYM_CACHE_DIR, else data-gym-cache in the temporary folder."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return os.environ[name]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


@pytest.fixture
def o200k():
    """For tests that tokenize with o200k_base (train.py's default tokenizer)."""
    skip_without("o200k_base")


# --- small models ----------------------------------------------------------------------------------

V_SMALL = 512  # a small vocabulary keeps most tests fast
# A small generator too (2 heads of rank 16 over 32 seed coordinates, 8 knots), for the tests of the
# train step's mechanics; the generator's own tests use the paper's full size.
SMALL_GENERATOR = dict(d_seed=32, gen_heads=2, gen_rank=16, gen_knots=8)


def small_config(model="leviathan", **overrides):
    fields = dict(vocab_size=V_SMALL, seq_len=16, batch_size=4, steps=100, dtype="float32", **SMALL_GENERATOR)
    return lv.config("tiny", model, **{**fields, **overrides})


# --- small data ------------------------------------------------------------------------------------


def doc(text, name="Test"):
    return {"text": text, "meta": {"pile_set_name": name}}


def write_shard(path, lines, frames=1):
    """Write JSON lines (dicts, or raw strings written as they are). A .zst path is compressed into
    `frames` zstd frames cut at arbitrary bytes, so lines straddle frame boundaries."""
    data = b"".join((json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n" for x in lines)
    if str(path).endswith(".zst"):
        cuts = np.linspace(0, len(data), frames + 1).astype(int)
        data = b"".join(zstandard.ZstdCompressor().compress(data[a:b]) for a, b in zip(cuts, cuts[1:]))
    path.write_bytes(data)
    return str(path)


def drain(next_item):
    """Every item of next_item() until it returns None."""
    items = []
    while (item := next_item()) is not None:
        items.append(item)
    return items


def all_batches(stream):
    return drain(stream.next_batch)


def words(n, seed=0):
    """n documents of random words (so that they compress poorly and differ)."""
    rng = np.random.default_rng(seed)
    vocab = ["river", "stone", "light", "quick", "seven", "under", "paper", "green", "north", "field"]
    return [doc(" ".join(rng.choice(vocab, rng.integers(3, 40)))) for _ in range(n)]


# --- a local HTTP server ----------------------------------------------------------------------------


class ShardServer:
    """Serves a folder on 127.0.0.1 with ETag and Range/If-Range. The first `drops` responses are cut
    off after `drop_after` bytes; `version` is the ETag, so changing it imitates a changed file."""

    def __init__(self, root, drops=0, drop_after=0):
        self.root, self.drops, self.drop_after, self.version, self.starts = root, drops, drop_after, 1, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = os.path.join(server.root, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    return self.send_error(404)
                data, etag = open(path, "rb").read(), f'"v{server.version}"'
                start = 0
                if self.headers.get("Range") and self.headers.get("If-Range") == etag:
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                server.starts.append(start)
                self.send_response(206 if start else 200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drops:
                    server.drops -= 1
                    self.wfile.write(data[start:start + server.drop_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                else:
                    self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    server = ShardServer(str(tmp_path))
    yield server
    server.close()


def free_port():
    """A local TCP port nothing listens on (the OS's pick, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- train.py as a user runs it --------------------------------------------------------------------

RUN = ["--size", "tiny", "--data", f"{MINIPILE}/00.jsonl.zst", f"{MINIPILE}/01.jsonl.zst",
       "--val-data", f"{MINIPILE}/val.jsonl.zst", "--steps", "8", "--batch-size", "4", "--seq-len", "32",
       "--shuffle-buffer", "64", "--eval-every", "4", "--eval-tokens", "512", "--log-every", "1",
       "--ckpt-every", "2", "--lr", "3e-3"]
TIMING = ("tok_per_s", "mfu", "elapsed_s")  # the only fields that may differ between identical runs


@pytest.fixture(scope="session")
def env():
    """Subprocess environment: one device (the XLA_FLAGS above are for this process's tests)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


def start(args, env, script="train.py", **kwargs):
    return subprocess.Popen([sys.executable, script, *args], cwd=HERE, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for_step(proc, out, step, timeout=120):
    """Wait until the run has logged `step`; it must still be running then."""
    deadline = time.time() + timeout
    log = os.path.join(out, "log.jsonl")
    while not (os.path.exists(log) and any(r["step"] >= step for r in read_log(out))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
