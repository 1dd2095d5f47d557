"""Train Leviathan, or its dense twin, on the Pile streamed straight from its shards.

    python train.py --size 60M                  # GPU: streams the uncopyrighted Pile over HTTP
    python train.py --size 60M --model dense    # its matched dense twin, on the identical tokens
    python train.py --size 60M --resume         # continue a stopped run exactly where it stopped
    python train.py --size tiny --data ../shared/minipile/00.jsonl.zst ../shared/minipile/01.jsonl.zst \\
        --val-data ../shared/minipile/val.jsonl.zst --steps 200 --batch-size 16 --seq-len 128 \\
        --eval-every 25 --eval-tokens 16384                                  # CPU, ~15 minutes

A run folder (--out, default runs/<size>-<model>) holds config.json, log.jsonl (one JSON object per
logged step, read by plot.py) and ckpt.npz (the last good checkpoint). The file reads top to bottom:

  1. Command line
  2. Reading shards: local files or HTTP (reconnecting mid-shard), zstd frames, lines
  3. The batch stream: documents -> tokens -> packed sequences -> shuffle buffer -> batches.
     A state machine whose state goes into every checkpoint, so a resumed run sees the same batches.
  4. The background loader
  5. Validation: a fixed token budget, bits per byte, loss by token-frequency bucket
  6. Checkpoints and logs
  7. The training run
  8. Loader throughput (bench.py --loader prints it)
"""

import argparse
import dataclasses
import glob
import hashlib
import http.client
import itertools
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import zstandard

# Offline use: tiktoken reads its cached files from ../shared/tiktoken unless told otherwise.
_SHARED_TIKTOKEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_SHARED_TIKTOKEN):
    os.environ["TIKTOKEN_CACHE_DIR"] = _SHARED_TIKTOKEN

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tiktoken  # noqa: E402

import leviathan as lv  # noqa: E402

PILE = "https://huggingface.co/datasets/monology/pile-uncopyrighted/resolve/main"
DEFAULT_DATA = [f"{PILE}/train/{i:02d}.jsonl.zst" for i in range(30)]
DEFAULT_VAL = [f"{PILE}/val.jsonl.zst"]
MICRO_TOKENS = 8192  # default micro-batch: about this many tokens per device per forward/backward pass
N_BUCKETS = 5  # token-frequency buckets of the validation loss

# ------------------------------------------------------------------------------------------------
# 1. Command line
# ------------------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem the user can fix, told in one sentence: main() prints it and exits with `code`."""

    code = 1


class DataError(UserError):
    """A shard that cannot be read: missing, corrupt, truncated, unreachable."""


class Interrupted(UserError):
    code = 130


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one sentence instead of argparse's usage block
        print(f"error: {message}; see python train.py --help.", file=sys.stderr)
        sys.exit(2)


def count(text):
    """A count written 2000000, 2e6 or 2M (suffixes k, M, B, T)."""
    scale = {"k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale != 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 2000000, 2e6 or 2M") from None


def parse_args(argv=None):
    p = OneLineParser(description="Train Leviathan or its dense twin on streamed Pile shards.")
    add = p.add_argument
    add("--size", default="60M", choices=list(lv.SIZES), help="model preset (default %(default)s)")
    add("--model", default="leviathan", choices=lv.MODELS, help="Leviathan or its dense twin "
        "(default %(default)s)")
    add("--data", nargs="+", help=".jsonl.zst/.jsonl files, globs, folders or http(s) URLs "
        "(default: the 30 train shards of the uncopyrighted Pile)")
    add("--val-data", nargs="+", help="validation shards (default: the Pile's val.jsonl.zst)")
    add("--tokenizer", default="o200k_base", help="a tiktoken encoding or 'bytes' (default %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: 20 tokens per parameter "
                        "of the dense twin)")
    length.add_argument("--tokens", type=count, help="training tokens instead of --steps, e.g. 2B")
    add("--batch-size", type=int, default=512, help="sequences per optimizer step (default %(default)s)")
    add("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s)")
    add("--micro-batch", type=int, help="sequences per pass, all devices together (default: about "
        f"{MICRO_TOKENS} tokens per device); gradients accumulate over the batch")
    add("--lr", type=float, help="peak learning rate (default: the size's)")
    add("--warmup", type=int, help="warmup steps (default: 2%% of the steps)")
    add("--seed", type=int, default=0, help="seeds the model and the data order (default %(default)s)")
    add("--eval-every", type=int, default=500, help="steps between evaluations, 0: only at the end "
        "(default %(default)s)")
    add("--eval-tokens", type=count, default=2_000_000, help="validation tokens (default 2M)")
    add("--log-every", type=int, default=10, help="steps between log lines (default %(default)s)")
    add("--ckpt-every", type=int, default=1000, help="steps between checkpoints (default %(default)s)")
    add("--out", help="run folder (default: runs/<size>-<model>)")
    add("--resume", action="store_true", help="continue from <out>/ckpt.npz")
    add("--dtype", choices=["float32", "bfloat16"], help="matmul dtype (default: bfloat16 on GPU/TPU, "
        "float32 on CPU)")
    add("--attention", choices=["xla", "cudnn"], help="attention kernel: xla (default), or cudnn's fused "
        "flash attention on NVIDIA GPUs")
    add("--shuffle-buffer", type=int, default=10_000, help="sequences shuffled (default %(default)s)")
    add("--loader-threads", type=int, default=max(1, min(8, (os.cpu_count() or 1) - 2)),
        help="tokenizer threads (default %(default)s)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# 2. Reading shards
# ------------------------------------------------------------------------------------------------

READ_SIZE = 1 << 20  # bytes per read
HTTP_RETRIES = 5  # failed attempts in a row before an HTTP shard gives up
HTTP_BACKOFF = 1.0  # seconds before the second retry; doubles with each further one
HTTP_TIMEOUT = 60  # seconds of silence before a connection counts as dropped


def is_url(source):
    return source.startswith(("http://", "https://"))


def resolve_sources(specs, flag):
    """Files, globs, folders and URLs -> the list of shards, in order. Missing local files fail here."""
    sources = []
    for spec in specs:
        if is_url(spec) or os.path.isfile(spec):
            sources.append(spec)
        elif os.path.isdir(spec):
            found = [f for f in sorted(glob.glob(os.path.join(spec, "*"))) if f.endswith((".zst", ".jsonl"))]
            if not found:
                raise DataError(f"{flag} folder {spec} holds no .jsonl.zst or .jsonl shard; check the path")
            sources += found
        elif glob.has_magic(spec):
            if not (found := sorted(glob.glob(spec))):
                raise DataError(f"{flag} pattern {spec} matches no file; check the path")
            sources += found
        else:
            raise DataError(f"shard {spec} does not exist; check the path given to {flag}")
    return sources


class HTTPReader:
    """The bytes of a URL, front to back. A dropped connection is reopened with a Range request at
    the byte where it stopped; If-Range carries the first response's ETag (or Last-Modified), so a
    file that changed on the server comes back whole (status 200) and is refused, never spliced."""

    def __init__(self, url):
        self.url, self.pos, self.size, self.validator, self.response = url, 0, None, None, None

    def read(self, n):
        for failures in itertools.count(1):
            try:
                if self.response is None:
                    self.response = self._request()
                data = self.response.read(n)
                if not data and self.size is not None and self.pos < self.size:
                    raise ConnectionError("the server closed the connection early")
                self.pos += len(data)
                return data
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):  # 404 and the like: retrying will not help
                    raise DataError(f"shard {self.url} answered HTTP {e.code} {e.reason}; "
                                    "check the URL") from None
                error = f"HTTP {e.code} {e.reason}"
            except (OSError, http.client.HTTPException) as e:
                error = getattr(e, "reason", None) or e
            self.close()
            if failures > HTTP_RETRIES:
                raise DataError(f"shard {self.url} could not be read after {HTTP_RETRIES} retries ({error}); "
                                "check the network or pass local shards with --data and --val-data")
            time.sleep(HTTP_BACKOFF * 2 ** (failures - 2) if failures > 1 else 0)

    def _request(self):
        headers = {"User-Agent": "leviathan-train"}
        if self.pos:
            if not self.validator:
                raise DataError(f"shard {self.url} dropped the connection and its server sends no ETag to "
                                "resume it safely; download the shard and pass the file with --data")
            headers.update({"Range": f"bytes={self.pos}-", "If-Range": self.validator})
        request = urllib.request.Request(self.url, headers=headers)
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
        if not self.pos:
            self.validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            length = response.headers.get("Content-Length")
            self.size = int(length) if length else None
        elif response.status != 206 or not response.headers.get("Content-Range", "").startswith(
                f"bytes {self.pos}-"):
            response.close()
            raise DataError(f"shard {self.url} changed on the server (or cannot resume) while it was read, "
                            "so it was not spliced; rerun with --resume to read it again")
        return response

    def close(self):
        if self.response is not None:
            self.response.close()
            self.response = None


def open_source(source):
    if is_url(source):
        return HTTPReader(source)
    try:
        return open(source, "rb")
    except OSError as e:
        raise DataError(f"shard {source} cannot be opened ({e.strerror}); check the path") from None


def zstd_chunks(raw, source):
    """Decompressed chunks of a zstd stream of one or more frames: read_across_frames=True done by
    hand, because zstandard's stream_reader ends a truncated file silently and here it is an error."""
    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)  # accept long-window (--long) files
    frame, inside_frame = dctx.decompressobj(), False
    while data := raw.read(READ_SIZE):
        while data:
            try:
                out = frame.decompress(data)
            except zstandard.ZstdError as e:
                raise DataError(f"shard {source} is corrupt ({e}); download it again or drop it") from None
            inside_frame, data = True, b""
            if frame.eof:  # the frame ended: the rest of the input starts the next one
                data, frame, inside_frame = frame.unused_data, dctx.decompressobj(), False
            if out:
                yield out
    if inside_frame:
        raise DataError(f"shard {source} is truncated (it ends inside a zstd frame); download it again")


def shard_lines(source, start=0):
    """Yield (line, end) for each line of a shard: its bytes without the newline, and the decompressed
    byte offset just after it. Begins at decompressed offset `start`, a line boundary: on resume the
    shard is decompressed up to there, but not parsed or tokenized again."""
    raw = open_source(source)
    try:
        plain = iter(lambda: raw.read(READ_SIZE), b"")
        chunks = zstd_chunks(raw, source) if source.endswith(".zst") else plain
        offset, rest = 0, b""  # offset: decompressed position of the first byte of `rest`
        for chunk in chunks:
            if offset + len(chunk) <= start:  # before the resume point
                offset += len(chunk)
                continue
            if offset < start:
                chunk, offset = chunk[start - offset:], start
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                offset += len(line) + 1
                yield line, offset
        if rest:
            yield rest, offset + len(rest)
    finally:
        raw.close()


# ------------------------------------------------------------------------------------------------
# 3. The batch stream
# ------------------------------------------------------------------------------------------------

MAX_CHARS = 400_000  # tiktoken can panic on huge inputs: longer documents are encoded in pieces
GROUP_CHARS = 1 << 21  # documents are read and tokenized about this many characters at a time


def split_text(text, max_chars):
    """Pieces of at most max_chars characters, cut before the last newline or space where possible."""
    pieces = []
    while len(text) > max_chars:
        cut = max(text.rfind("\n", 1, max_chars), text.rfind(" ", 1, max_chars))
        cut = cut if cut > 0 else max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + [text]


def chain_hash(previous, tokens):
    """data_hash after a batch: blake2b-128 of (the previous hash's bytes + tokens as int32 LE)."""
    h = hashlib.blake2b(bytes.fromhex(previous), digest_size=16)
    h.update(np.ascontiguousarray(tokens, "<i4").tobytes())
    return h.hexdigest()


class BatchStream:
    """Shards -> documents -> tokens -> sequences of seq_len+1 -> shuffle buffer -> batches (B, T+1).

    Each document's text is tokenized (encode_ordinary) and followed by one EOT token; the token
    stream is cut into consecutive sequences of seq_len+1 (inputs and next-token targets). A seeded
    buffer of `shuffle_buffer` sequences shuffles them: once full, each new sequence takes the place of
    a random one, which goes out. With loop=True the shards are read again and again in the same order
    (epochs); with loop=False the stream ends by draining the buffer in random order.

    A deterministic state machine: `state()` (the next unread line, the tokens not yet packed, the
    buffer, the RNG, running statistics) continues it exactly. The model is not an input, so a
    Leviathan run and its dense twin see identical batches.
    """

    def __init__(self, sources, enc, seq_len, batch_size, seed=0, shuffle_buffer=10_000,
                 vocab_size=None, loop=True, threads=1):
        self.sources, self.enc, self.seq_len, self.batch_size = list(sources), enc, seq_len, batch_size
        self.shuffle_size, self.loop, self.threads = shuffle_buffer, loop, threads
        self.rng = np.random.default_rng(seed)
        self.epoch = self.shard = self.line = self.offset = 0  # where the next unread line is
        self.pending = np.zeros(0, np.int32)  # tokens read but not yet packed into a sequence
        self.buffer = []  # the shuffle buffer: (seq_len+1,) int32 arrays, never changed in place
        self.batches = 0  # batches emitted
        self.data_hash = "0" * 32  # chain_hash over every batch emitted
        self.counts = np.zeros(vocab_size or enc.n_vocab, np.int64)  # target tokens emitted, per id
        self.bad_lines = 0  # lines that are not JSON with a string "text"
        self.documents = {}  # pile_set_name -> documents read
        self._lines = None  # the open shard's line iterator; not state: reopened at `offset`

    def _read_documents(self):
        """Tokenize the next ~GROUP_CHARS characters of documents onto self.pending. False at the end."""
        texts, chars, wraps = [], 0, 0
        while chars < GROUP_CHARS:
            if self.shard == len(self.sources):
                if not self.loop or texts:
                    break
                wraps += 1
                if wraps == 2:  # a whole pass over the shards found no document
                    raise DataError(f"the training data ({self.sources[0]}, ...) holds no document")
                self.epoch, self.shard = self.epoch + 1, 0
            if self._lines is None:
                self._lines = shard_lines(self.sources[self.shard], self.offset)
            if (item := next(self._lines, None)) is None:  # end of this shard
                self._lines, self.shard, self.line, self.offset = None, self.shard + 1, 0, 0
                continue
            line, self.offset = item
            self.line += 1
            if text := self._parse(line):
                texts.append(text)
                chars += len(text)
        if texts:
            self.pending = np.concatenate([self.pending, self._tokenize(texts)])
        return bool(texts)

    def _parse(self, line):
        """The text of one JSON line; None for a blank line or a bad one (which is counted)."""
        if not line.strip():
            return None
        try:
            doc = json.loads(line)
            text, name = doc["text"], str((doc.get("meta") or {}).get("pile_set_name", "unknown"))
            if not isinstance(text, str):
                raise TypeError("text is not a string")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.bad_lines += 1
            return None
        self.documents[name] = self.documents.get(name, 0) + 1
        return text

    def _tokenize(self, texts):
        """Documents -> their tokens, each document followed by EOT: (n,) int32."""
        pieces = [split_text(text, MAX_CHARS) for text in texts]
        flat = [piece for doc in pieces for piece in doc]
        if self.threads > 1:
            encoded = iter(self.enc.encode_ordinary_batch(flat, num_threads=self.threads))
        else:
            encoded = map(self.enc.encode_ordinary, flat)
        eot, arrays = np.array([self.enc.eot_token], np.int32), []
        for doc in pieces:
            arrays += [np.array(next(encoded), np.int32) for _ in doc] + [eot]
        return np.concatenate(arrays)

    def next_sequence(self):
        """The next packed sequence (seq_len+1,) int32 in reading order, or None at the end."""
        n = self.seq_len + 1
        while len(self.pending) < n:
            if not self._read_documents():
                return None
        sequence, self.pending = self.pending[:n].copy(), self.pending[n:]
        return sequence

    def next_batch(self):
        """The next batch (batch_size, seq_len+1) int32, or None at the end (a partial batch is dropped)."""
        rows = []
        while len(rows) < self.batch_size:
            sequence = self.next_sequence()
            if sequence is None:  # end of the data: drain the buffer in random order
                if not self.buffer:
                    return None
                i = self.rng.integers(len(self.buffer))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                rows.append(self.buffer.pop())
            elif self.shuffle_size == 0:
                rows.append(sequence)
            elif len(self.buffer) < self.shuffle_size:  # filling up
                self.buffer.append(sequence)
            else:  # a random sequence goes out, the new one takes its place
                i = self.rng.integers(self.shuffle_size)
                rows.append(self.buffer[i])
                self.buffer[i] = sequence
        tokens = np.stack(rows)  # (B, T+1)
        self.batches += 1
        self.data_hash = chain_hash(self.data_hash, tokens)
        self.counts += np.bincount(tokens[:, 1:].ravel(), minlength=len(self.counts))
        return tokens

    def state(self):
        """Everything needed to continue exactly from here. Cheap: only `counts` is copied; pending
        and the buffer's rows are never changed in place, so sharing them is safe."""
        return {"epoch": self.epoch, "shard": self.shard, "line": self.line, "offset": self.offset,
                "batches": self.batches, "data_hash": self.data_hash, "bad_lines": self.bad_lines,
                "documents": dict(self.documents), "rng": self.rng.bit_generator.state,
                "pending": self.pending, "buffer": list(self.buffer), "counts": self.counts.copy()}

    def load_state(self, state):
        if self._lines is not None:
            self._lines.close()
        self._lines = None
        for key in ("epoch", "shard", "line", "offset", "batches", "data_hash", "bad_lines"):
            setattr(self, key, state[key])
        self.documents = dict(state["documents"])
        self.rng.bit_generator.state = state["rng"]
        self.pending = np.asarray(state["pending"], np.int32)
        self.buffer = list(state["buffer"])
        self.counts = np.array(state["counts"], np.int64)


def make_stream(args, enc, sources):
    """The training stream of a command line: data, tokenizer, seed and batch shape; not --model."""
    return BatchStream(sources, enc, args.seq_len, args.batch_size, seed=args.seed,
                       shuffle_buffer=args.shuffle_buffer, vocab_size=lv.padded_vocab(enc),
                       threads=args.loader_threads)


def token_sequences(sources, enc, seq_len):
    """Packed sequences (seq_len+1,) int32 of shards (paths or URLs) in reading order, once through."""
    stream = BatchStream(sources, enc, seq_len, batch_size=1, shuffle_buffer=0, loop=False)
    while (sequence := stream.next_sequence()) is not None:
        yield sequence


# ------------------------------------------------------------------------------------------------
# 4. The background loader
# ------------------------------------------------------------------------------------------------


def produce(stream, n_devices):
    """One loader item: (prepared batch, the stream's state just after it), or None at the end."""
    tokens = stream.next_batch()
    return None if tokens is None else (lv.prepare_batch(tokens, n_devices), stream.state())


class Loader:
    """Runs a BatchStream in a background thread, up to `depth` batches ahead of training.

    Every batch comes with the stream's state just after it. The training loop checkpoints the state
    that came with the last batch it trained on, so a resumed run restarts the stream right after
    that batch, however far ahead the thread had read, and without replaying anything."""

    def __init__(self, stream, n_devices=1, depth=8):
        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        threading.Thread(target=self._run, args=(stream, n_devices), daemon=True).start()

    def _run(self, stream, n_devices):
        try:
            while (item := produce(stream, n_devices)) is not None:
                self._put(item)
            self._put(DataError("the training data ran out"))
        except Exception as error:  # handed over to the training loop, which reports it
            self._put(error)

    def _put(self, item):
        while not self.stop.is_set():
            try:
                return self.queue.put(item, timeout=0.1)
            except queue.Full:
                pass

    def __next__(self):
        item = self.queue.get()
        if isinstance(item, Exception):
            self.queue.put(item)  # later calls fail the same way
            raise item
        return item

    def close(self):
        self.stop.set()


# ------------------------------------------------------------------------------------------------
# 5. Validation
# ------------------------------------------------------------------------------------------------


def load_validation(sources, enc, seq_len, n_tokens, rows, n_devices=1):
    """The first ~n_tokens tokens of the validation data, unshuffled, as fixed batches of `rows`
    sequences: the same tokens and shapes at every evaluation. -> {"batches", "tokens", "bytes"}."""
    sequences = list(itertools.islice(token_sequences(sources, enc, seq_len), math.ceil(n_tokens / seq_len)))
    rows = min(rows, len(sequences) // n_devices * n_devices)
    if rows == 0:
        raise DataError(f"the validation data ({sources[0]}, ...) holds fewer than {n_devices} sequence(s) "
                        f"of {seq_len + 1} tokens; pass more --val-data")
    tokens = np.stack(sequences[:len(sequences) // rows * rows])  # (N, T+1)
    ids, counts = np.unique(tokens[:, 1:], return_counts=True)
    # bits per byte count the UTF-8 bytes of the text; EOT, a separator, stands for none
    n_bytes = sum(int(c) * len(enc.decode_single_token_bytes(int(i))) for i, c in zip(ids, counts)
                  if i != enc.eot_token)
    chunks = [tokens[i:i + rows] for i in range(0, len(tokens), rows)]
    # one padded size of distinct ids for every batch: the eval step compiles once
    size = lv.bucket_size(max(len(np.unique(c[:, :-1])) for c in chunks), n_devices)
    batches = [lv.prepare_batch(c, n_devices, size=size) for c in chunks]
    return {"batches": batches, "tokens": int(tokens[:, 1:].size), "bytes": n_bytes}


def frequency_buckets(counts, n_buckets=N_BUCKETS):
    """Bucket of every vocabulary id by training frequency: counts (V,) -> (V,) ints in [0, n_buckets).

    Ids sorted by count (descending, ties by id) are cut into n_buckets runs of equal token mass: an
    id goes to bucket floor(n_buckets * (mass of the ids before it) / total mass). Bucket 0 holds the
    most frequent ids; the last holds the rarest and every id never seen. A very frequent id can leave
    the bucket after it empty."""
    counts = np.asarray(counts, np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count descending, then by id
    mass_before = np.cumsum(counts[order]) - counts[order]
    buckets = np.empty(len(counts), np.int64)
    buckets[order] = mass_before * n_buckets // max(int(counts.sum()), 1)
    buckets[counts == 0] = n_buckets - 1
    return buckets


def loss_summary(losses, targets, buckets, n_bytes):
    """Per-token losses and their targets -> val_loss (nats/token), val_bpb and the loss per bucket,
    whose token-weighted mean is val_loss."""
    losses, targets = np.asarray(losses, np.float64).ravel(), np.asarray(targets).ravel()
    which = buckets[targets]
    tokens = np.bincount(which, minlength=N_BUCKETS)
    sums = np.bincount(which, weights=losses, minlength=N_BUCKETS)
    return {"val_loss": float(losses.mean()),
            "val_bpb": float(losses.sum() / n_bytes / math.log(2)) if n_bytes else None,
            "val_bucket_loss": [float(s / n) if n else None for s, n in zip(sums, tokens)],
            "val_bucket_tokens": [int(n) for n in tokens]}


def evaluate(eval_step, params, val, counts, mesh):
    """Loss on the fixed validation batches, bucketed by the training token counts so far."""
    outputs = [eval_step(params, lv.shard_batch(batch, mesh)) for batch in val["batches"]]  # (rows, T)
    losses = np.concatenate([np.asarray(out) for out in outputs])
    targets = np.concatenate([batch["targets"] for batch in val["batches"]])
    return loss_summary(losses, targets, frequency_buckets(counts), val["bytes"])


# ------------------------------------------------------------------------------------------------
# 6. Checkpoints and logs
# ------------------------------------------------------------------------------------------------


def write_atomically(path, data):
    """Write bytes (or call data(file)) into path + '.tmp', sync it, rename: `path` is always whole."""
    with open(path + ".tmp", "wb") as f:
        data(f) if callable(data) else f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def save_checkpoint(path, train_state, data_state, meta):
    """One .npz: state_0 ... (the leaves of the train state: params, optimizer state, step),
    data_pending, data_buffer, data_counts, and meta (JSON: step, run settings, data position)."""
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(train_state))]
    arrays = {f"state_{i}": x if x.dtype.kind in "biuf" else x.view(f"u{x.dtype.itemsize}")  # bfloat16
              for i, x in enumerate(leaves)}
    buffer = data_state["buffer"]
    arrays.update(data_pending=data_state["pending"], data_counts=data_state["counts"],
                  data_buffer=np.stack(buffer) if buffer else np.zeros((0, 0), np.int32))
    position = {k: v for k, v in data_state.items() if k not in ("pending", "buffer", "counts")}
    arrays["meta"] = np.array(json.dumps({**meta, "n_leaves": len(leaves), "data": position}))
    write_atomically(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """-> (meta, leaves, data_state) of a checkpoint written by save_checkpoint."""
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            leaves = [f[f"state_{i}"] for i in range(meta["n_leaves"])]
            data = {**meta.pop("data"), "pending": f["data_pending"], "buffer": list(f["data_buffer"]),
                    "counts": f["data_counts"]}
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}); restore it or start a new --out") from None
    return meta, leaves, data


def restore_state(fresh, leaves):
    """A freshly initialised train state holding the checkpoint's values, placed like the fresh one."""
    ref, treedef = jax.tree_util.tree_flatten(fresh)
    if [r.shape for r in ref] != [x.shape for x in leaves]:
        raise UserError("the checkpoint's arrays do not fit this model; resume with the original flags")
    return jax.tree_util.tree_unflatten(
        treedef, [jax.device_put(np.asarray(x).view(r.dtype), r.sharding) for x, r in zip(leaves, ref)])


@jax.jit
def all_finite(tree):
    """True when no array of the pytree holds a NaN or an infinity."""
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]).all()


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Keep the log lines up to `step`: a resumed run writes the later steps again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines, kept = f.read().splitlines(), []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
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
# 7. The training run
# ------------------------------------------------------------------------------------------------

ADJUSTABLE = ("lr", "warmup_steps", "steps")  # may change on --resume (a lower lr after a divergence)


def tokenizer(name):
    if name == "bytes":
        return lv.byte_encoding()
    if name not in tiktoken.list_encoding_names():
        raise UserError(f"unknown --tokenizer {name!r}: use 'bytes' or one of "
                        f"{', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise UserError(f"the tiktoken encoding {name} could not be loaded ({type(e).__name__}); offline, "
                        "set TIKTOKEN_CACHE_DIR to a folder with its cached file, such as "
                        "../shared/tiktoken") from None


def default_micro_batch(batch_size, seq_len, n_devices):
    """The largest micro-batch that divides the batch, is a multiple of the device count, and has at
    most MICRO_TOKENS tokens per device."""
    limit = max(1, MICRO_TOKENS // seq_len) * n_devices
    fits = [m for m in range(n_devices, batch_size + 1, n_devices) if batch_size % m == 0 and m <= limit]
    return max(fits) if fits else batch_size


def build_config(args, enc, n_devices):
    """(model Config of a command line, dense twin's parameter count). Steps default to 20 tokens per
    parameter of the dense twin."""
    B, T, vocab = args.batch_size, args.seq_len, lv.padded_vocab(enc)
    micro = args.micro_batch or default_micro_batch(B, T, n_devices)
    if B % micro or micro % n_devices:
        raise UserError(f"--batch-size {B} does not split into micro-batches of {micro}, a multiple of the "
                        f"{n_devices} device(s); change --batch-size or --micro-batch")
    dense_params = lv.param_counts(lv.config(args.size, "dense", vocab_size=vocab, seq_len=T))
    steps = args.steps or math.ceil((args.tokens or 20 * dense_params) / (B * T))
    overrides = dict(vocab_size=vocab, seq_len=T, batch_size=B, micro_batch=micro, steps=steps,
                     warmup_steps=args.warmup if args.warmup is not None else round(0.02 * steps))
    given = {"lr": args.lr, "dtype": args.dtype, "attention": args.attention}
    overrides.update({key: value for key, value in given.items() if value is not None})
    return lv.config(args.size, args.model, **overrides), dense_params


def changed_settings(old, new):
    """The run settings that differ between a checkpoint and this command, ADJUSTABLE aside."""
    changed = [key for key in new if key != "config" and old.get(key) != new[key]]
    return changed + [key for key in new["config"]
                      if key not in ADJUSTABLE and old["config"].get(key) != new["config"][key]]


def setup(args):
    """Everything a run needs, checked in an order that fails fast: flags, checkpoint, validation data,
    first training batch; only then the model. Writes config.json and trims log.jsonl on --resume."""
    enc = tokenizer(args.tokenizer)
    train_sources = resolve_sources(args.data or DEFAULT_DATA, "--data")
    val_sources = resolve_sources(args.val_data or DEFAULT_VAL, "--val-data")
    mesh = lv.make_mesh()
    cfg, dense_params = build_config(args, enc, mesh.size)
    out = args.out or os.path.join("runs", f"{args.size}-{args.model}")
    r = types.SimpleNamespace(cfg=cfg, mesh=mesh, out=out, start=0, ckpt=os.path.join(out, "ckpt.npz"),
                              log=os.path.join(out, "log.jsonl"))
    # what decides the run's numbers; a resumed run must agree on it
    r.settings = {"config": dataclasses.asdict(cfg), "data": train_sources, "val_data": val_sources,
                  "tokenizer": enc.name, "seed": args.seed, "shuffle_buffer": args.shuffle_buffer,
                  "eval_tokens": args.eval_tokens}
    stream = make_stream(args, enc, train_sources)
    if args.resume:
        if not os.path.exists(r.ckpt):
            raise UserError(f"--resume found no checkpoint {r.ckpt}; run without --resume to start afresh")
        meta, leaves, data_state = load_checkpoint(r.ckpt)
        if changed := changed_settings(meta["run"], r.settings):
            raise UserError(f"--resume: {', '.join(changed)} differ from the checkpointed run; rerun with "
                            "its original flags or choose a new --out")
        stream.load_state(data_state)
        r.start = meta["step"]
    elif os.path.exists(r.ckpt):
        raise UserError(f"{out} already holds a run ({r.ckpt}); add --resume to continue it or choose "
                        "another --out")

    r.val = load_validation(val_sources, enc, cfg.seq_len, args.eval_tokens, cfg.micro_batch, mesh.size)
    r.loader = Loader(stream, mesh.size)
    r.first = next(r.loader)  # a bad training shard fails here, before anything is compiled
    r.state = lv.init_state(jax.random.key(args.seed), cfg, mesh)
    if args.resume:
        r.state = restore_state(r.state, leaves)

    params = r.state["params"]
    config = {"model": args.model, "size": args.size, "seed": args.seed, "n_params": lv.count_params(params),
              "n_params_embedding": lv.count_params(params[lv.EMBEDDING_PARAMS[args.model]]),
              "n_params_dense_twin": dense_params, "steps": cfg.steps,
              "tokens_per_step": cfg.batch_size * cfg.seq_len,
              "val_tokens": r.val["tokens"], "val_bytes": r.val["bytes"], "eot_token": enc.eot_token,
              "eval_every": args.eval_every, "log_every": args.log_every, "ckpt_every": args.ckpt_every,
              "n_devices": mesh.size, "device_kind": jax.devices()[0].device_kind, "command": sys.argv,
              **r.settings}
    os.makedirs(out, exist_ok=True)
    write_atomically(os.path.join(out, "config.json"), json.dumps(config, indent=1).encode())
    truncate_log(r.log, r.start) if args.resume else open(r.log, "w").close()
    print(f"{args.model} {args.size}: {config['n_params']:,} parameters, {cfg.steps:,} steps of "
          f"{cfg.batch_size} x {cfg.seq_len} tokens, micro-batch {cfg.micro_batch}, {mesh.size} device(s), "
          f"{f'resuming at step {r.start}' if args.resume else 'from scratch'} -> {out}")
    return r


def train(args):
    r = setup(args)
    cfg, mesh, tokens_per_step = r.cfg, r.mesh, r.cfg.batch_size * r.cfg.seq_len
    eval_step, peak = lv.make_eval_step(cfg, mesh), lv.peak_flops()
    last_saved = r.start if args.resume else None
    stop, failed = [], []  # a Ctrl-C / SIGTERM received; a loader error met
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()

    def kept():
        if last_saved is None:
            return "no checkpoint had been saved yet; lower --lr and start again"
        return f"the last good checkpoint (step {last_saved}) is kept: lower --lr and resume from it"

    def batches():
        """(host batch, (data state after it, distinct ids in it)) for lv.train_loop."""
        item = r.first
        while True:
            batch, data_state = item
            yield batch, (data_state, int(batch["inverse"].max()) + 1)  # ids before padding
            try:
                item = next(r.loader)
            except DataError as error:
                failed.append(error)
                raise

    def is_eval(step):
        return step == cfg.steps or bool(args.eval_every and step % args.eval_every == 0)

    def hold(step):  # steps that need the state itself: evaluation, checkpoint, stopping
        return is_eval(step) or step % args.ckpt_every == 0 or bool(stop)

    def on_step(step, state, metrics, info):
        nonlocal last_saved
        data_state, n_ids = info
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            raise UserError(f"training diverged by step {step} (loss {metrics['loss']}, grad norm "
                            f"{metrics['grad_norm']}), so nothing more was saved; {kept()}")
        if is_eval(step) or step % args.log_every == 0 or step == r.start + 1:
            now = time.perf_counter()
            record = {"step": step, "tokens": step * tokens_per_step, "epoch": data_state["epoch"],
                      "train_loss": metrics["loss"], "lr": metrics["lr"],
                      "grad_norm": metrics["grad_norm"], "tok_per_s": metrics["tok_per_s"],
                      "mfu": None, "elapsed_s": now - started, "data_hash": data_state["data_hash"],
                      "bad_lines": data_state["bad_lines"]}
            if peak:
                flops = lv.flops_per_step(cfg, tokens_per_step, n_ids)
                record["mfu"] = flops * metrics["tok_per_s"] / tokens_per_step / (peak * mesh.size)
            if is_eval(step):
                record.update(evaluate(eval_step, state["params"], r.val, data_state["counts"], mesh),
                              documents=data_state["documents"])
            append_log(r.log, record)
            eta = (now - started) / (step - r.start) * (cfg.steps - step)
            print(console_line(record, cfg.steps, eta), flush=True)
        if state is not None and (step % args.ckpt_every == 0 or step == cfg.steps or stop or failed):
            if not bool(all_finite(state)):
                raise UserError(f"the state after step {step} is not finite, so it was not saved; "
                                f"{kept()}")
            save_checkpoint(r.ckpt, state, data_state, {"step": step, "run": r.settings})
            last_saved = step
            print(f"checkpoint: step {step} -> {r.ckpt}", flush=True)
        if stop and state is not None:
            raise Interrupted(f"stopped by signal {stop[0]} after step {step}, which is checkpointed; "
                              "rerun the same command with --resume to continue")

    try:
        lv.train_loop(r.state, batches(), lv.make_train_step(cfg, mesh), cfg.steps - r.start,
                      log_every=args.log_every, callback=on_step, mesh=mesh, hold=hold)
    finally:
        r.loader.close()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    print(f"done: {cfg.steps} steps, {cfg.steps * tokens_per_step:,} tokens -> {r.out}")
    return 0


# ------------------------------------------------------------------------------------------------
# 8. Loader throughput (bench.py --loader prints it)
# ------------------------------------------------------------------------------------------------


def loader_throughput(paths, encoding="o200k_base", seq_len=512, batch_size=512, seconds=20.0,
                      max_batches=None, shuffle_buffer=10_000, seed=0, threads=1):
    """Tokens/s of the whole loader (decompress, parse, tokenize, pack, shuffle, prepare_batch, state)
    on the calling thread, once the shuffle buffer is full (the fill is timed apart). Stops after
    `seconds` or `max_batches`, whichever comes first."""
    enc = tokenizer(encoding) if isinstance(encoding, str) else encoding
    stream = BatchStream(resolve_sources(paths, "--data"), enc, seq_len, batch_size, seed, shuffle_buffer,
                         lv.padded_vocab(enc), threads=threads)
    t0 = time.perf_counter()
    produce(stream, 1)
    t1 = time.perf_counter()
    for n in itertools.count(1):
        produce(stream, 1)
        elapsed = time.perf_counter() - t1
        if (max_batches is not None and n >= max_batches) or (seconds is not None and elapsed >= seconds):
            break
    tokens = n * batch_size * (seq_len + 1)
    return {"tokens_per_s": tokens / elapsed, "batches": n, "tokens": tokens, "seconds": elapsed,
            "fill_seconds": t1 - t0, "epochs": stream.epoch, "bad_lines": stream.bad_lines,
            "threads": threads, "tokenizer": enc.name, "seq_len": seq_len, "batch_size": batch_size}


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted before training started; there was nothing to save.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
