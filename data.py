"""The data pipeline: Pile shards (local files or HTTP) -> tokens -> packed, shuffled batches.

    stream = BatchStream(resolve_sources(["corpus/minipile"], "--data"), tokenizer("o200k_base"),
                         seq_len=512, batch_size=512)
    tokens = stream.next_batch()          # (512, 513) int32: inputs and next-token targets
    state = stream.state()                # goes into a checkpoint; load_state(state) continues exactly

The file reads top to bottom:

  1. Sources and errors: files, globs, folders, URLs; tokenizers; numbers on a command line
  2. Reading shards: local files or HTTP (reconnecting mid-shard), zstd frames, lines, text files
  3. The batch stream: documents -> tokens -> packed sequences -> shuffle buffer -> batches.
     A state machine whose state goes into every checkpoint, so a resumed run sees the same batches.
  4. The background loader
  5. Validation: tokens, token-frequency buckets (of targets and of inputs), loss summary
  6. Loader throughput (bench.py --loader prints it)

Nothing here depends on the model, so a Leviathan run and its dense twin see identical batches.
"""

import argparse
import glob
import hashlib
import http.client
import itertools
import json
import math
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import zstandard

import tiktoken

import leviathan as lv

PILE = "https://huggingface.co/datasets/monology/pile-uncopyrighted/resolve/main"
DEFAULT_DATA = [f"{PILE}/train/{i:02d}.jsonl.zst" for i in range(30)]
DEFAULT_VAL = [f"{PILE}/val.jsonl.zst"]
SHUFFLE_BUFFER = 10_000  # sequences in the shuffle buffer (paper: 10,000)
N_BUCKETS = 5  # token-frequency buckets of the validation loss

# ------------------------------------------------------------------------------------------------
# 1. Sources and errors
# ------------------------------------------------------------------------------------------------


class UserError(Exception):
    """A problem the user can fix, told in one sentence: train.py prints it and exits with `code`."""

    code = 1


class DataError(UserError):
    """A shard that cannot be read: missing, corrupt, truncated, unreachable."""


def tokenizer(name):
    """A tiktoken encoding by name, or "bytes" (256 byte tokens + EOT, offline)."""
    if name == "bytes":
        return lv.byte_encoding()
    if name not in tiktoken.list_encoding_names():
        raise UserError(f"unknown --tokenizer {name!r}: use 'bytes' or one of "
                        f"{', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise UserError(f"the tiktoken encoding {name} could not be loaded ({type(e).__name__}): tiktoken "
                        "downloads it once (about 5 MB) and then reads it from its cache; connect once, or set "
                        "TIKTOKEN_CACHE_DIR to a folder holding its cached file, or use --tokenizer bytes") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one sentence (exit status 2), not a usage block."""

    def error(self, message):
        print(f"error: {message}; see python {self.prog} --help.", file=sys.stderr)
        sys.exit(2)


def whole(low):
    """An argparse type: a whole number of at least `low`, else one sentence naming the range."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number of {low} or more, not {text!r}")
        return value
    return parse


def positive(text):
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
    return value


def is_url(source):
    return source.startswith(("http://", "https://"))


TEXT_SUFFIXES = (".txt", ".md", ".text")  # plain text; every other source is JSON lines like the Pile's
SOURCE_SUFFIXES = (".jsonl", ".jsonl.zst", ".zst") + TEXT_SUFFIXES + tuple(s + ".zst" for s in TEXT_SUFFIXES)


def is_text(source):
    """True for a plain-text source (.txt, .md, .text, or those compressed with .zst)."""
    return source.lower().removesuffix(".zst").endswith(TEXT_SUFFIXES)


def files_under(folder):
    """The shard and text files below a folder, subfolders included, in sorted order."""
    found = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if name.lower().endswith(SOURCE_SUFFIXES) and not name.startswith(".")]
    return sorted(found)


def resolve_sources(specs, flag):
    """Files, globs, folders and URLs -> the list of shards, in order. Missing local files fail here."""
    sources = []
    for spec in specs:
        if is_url(spec) or os.path.isfile(spec):
            sources.append(spec)
        elif os.path.isdir(spec):
            if not (found := files_under(spec)):
                raise DataError(f"{flag} folder {spec} holds no .jsonl.zst, .jsonl, .txt or .md file; "
                                "check the path")
            sources += found
        elif glob.has_magic(spec):
            if not (found := sorted(glob.glob(spec))):
                raise DataError(f"{flag} pattern {spec} matches no file; check the path")
            sources += found
        else:
            raise DataError(f"shard {spec} does not exist; check the path given to {flag}")
    return sources


# ------------------------------------------------------------------------------------------------
# 2. Reading shards
# ------------------------------------------------------------------------------------------------

READ_SIZE = 1 << 20  # bytes per read
HTTP_RETRIES = 5  # failed attempts in a row before an HTTP shard gives up
HTTP_BACKOFF = 1.0  # seconds before the second retry; doubles with each further one
HTTP_TIMEOUT = 60  # seconds of silence before a connection counts as dropped


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


TEXT_DOCUMENT = 1 << 20  # a text file is one document, cut at a blank line after every ~1 MB of it


def text_documents(source, start=0):
    """Yield (document, end) for a plain-text file: the whole file is one document, except that a
    file over TEXT_DOCUMENT bytes is cut at the first blank line after each TEXT_DOCUMENT bytes, so a
    big file streams. `end` is the byte offset after the document: a line boundary, to resume from."""
    lines, size, end = [], 0, start
    for line, end in shard_lines(source, start):
        if size >= TEXT_DOCUMENT and not line.strip():
            yield b"\n".join(lines), end
            lines, size = [], 0
        else:
            lines.append(line)
            size += len(line) + 1
    if lines:
        yield b"\n".join(lines), end


def shard_records(source, start=0):
    """(record, end) of a source: the lines of a JSON-lines shard, the documents of a text file."""
    return text_documents(source, start) if is_text(source) else shard_lines(source, start)


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

    A document is a JSON line's "text" (the Pile's format) or a plain-text file (`text_documents`).
    Each document's text is tokenized (encode_ordinary) and followed by one EOT token; the token
    stream is cut into consecutive sequences of seq_len+1 (inputs and next-token targets). A seeded
    buffer of `shuffle_buffer` sequences shuffles them: once full, each new sequence takes the place of
    a random one, which goes out. With loop=True the shards are read again and again in the same order
    (epochs); with loop=False the stream ends by draining the buffer in random order.

    A deterministic state machine: `state()` (the next unread line, the tokens not yet packed, the
    buffer, the RNG, running statistics) continues it exactly. The model is not an input, so a
    Leviathan run and its dense twin see identical batches.
    """

    def __init__(self, sources, enc, seq_len, batch_size, seed=0, shuffle_buffer=SHUFFLE_BUFFER,
                 vocab_size=None, loop=True, threads=1, share=(0, 1)):
        self.sources, self.enc, self.seq_len, self.batch_size = list(sources), enc, seq_len, batch_size
        self.shuffle_size, self.loop, self.threads = shuffle_buffer, loop, threads
        # share (p, n): read only part p of n of the data (a process of n): shards p::n, or when there
        # are fewer shards than parts, records p::n of every shard; with its own seeded shuffle
        p, n = share
        self.stride = None if n == 1 or len(self.sources) >= n else (p, n)
        self.sources = self.sources if self.stride or n == 1 else self.sources[p::n]
        self.rng = np.random.default_rng(seed if n == 1 else [seed, p])
        self.epoch = self.shard = self.line = self.offset = 0  # where the next unread record is
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
                    raise DataError(f"the training data ({self.sources[0]}, ...) holds no document: no line "
                                    "is JSON with a \"text\" string; plain text must end in .txt or .md")
                self.epoch, self.shard = self.epoch + 1, 0
            source = self.sources[self.shard]
            if self._lines is None:
                self._lines = shard_records(source, self.offset)
            if (item := next(self._lines, None)) is None:  # end of this shard
                self._lines, self.shard, self.line, self.offset = None, self.shard + 1, 0, 0
                continue
            record, self.offset = item
            self.line += 1
            if self.stride and (self.line - 1) % self.stride[1] != self.stride[0]:  # another part's record
                continue
            if text := (self._text(record) if is_text(source) else self._parse(record)):
                texts.append(text)
                chars += len(text)
        if texts:
            self.pending = np.concatenate([self.pending, self._tokenize(texts)])
        return bool(texts)

    def _text(self, document):
        """The text of a plain-text document; None when it is blank."""
        if not document.strip():
            return None
        self.documents["text"] = self.documents.get("text", 0) + 1
        return document.decode("utf-8", errors="replace")

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


class SharedStream:
    """The global batch stream of a run over n processes: rows [p B/n, (p+1) B/n) of every batch come
    from the BatchStream of share p (`BatchStream(share=(p, n))`). A process reads its own shares
    (`local`) and `exchange(batch_index, {share: rows})` returns every share's rows (through the
    processes' key-value store in train.py; the identity when one process reads all n shares, which
    gives the same batches). The global batch, its data_hash and the token counts are the same on
    every process, and depend on the data, tokenizer, seed, batch shape and n, never on the model."""

    def __init__(self, sources, enc, seq_len, batch_size, n, local, exchange=None, seed=0,
                 shuffle_buffer=SHUFFLE_BUFFER, vocab_size=None, threads=1):
        if batch_size % n:
            raise UserError(f"--batch-size {batch_size} does not split into {n} equal shares, one per process; "
                            f"give a multiple of {n}")
        self.n, self.exchange = n, exchange or (lambda i, rows: rows)
        self.shares = {p: BatchStream(sources, enc, seq_len, batch_size // n, seed, shuffle_buffer, vocab_size,
                                      threads=threads, share=(p, n)) for p in local}
        self.batches, self.data_hash = 0, "0" * 32  # as BatchStream's, over the global batches
        self.counts = np.zeros(vocab_size or enc.n_vocab, np.int64)

    def next_batch(self):
        """The next global batch (batch_size, seq_len+1) int32."""
        rows = self.exchange(self.batches, {p: stream.next_batch() for p, stream in self.shares.items()})
        tokens = np.concatenate([rows[p] for p in range(self.n)])
        self.batches += 1
        self.data_hash = chain_hash(self.data_hash, tokens)
        self.counts += np.bincount(tokens[:, 1:].ravel(), minlength=len(self.counts))
        return tokens

    def state(self):
        """The global position, and each local share's BatchStream state under "shares"."""
        local = [stream.state() for stream in self.shares.values()]
        documents = {}
        for s in local:
            documents.update({k: documents.get(k, 0) + v for k, v in s["documents"].items()})
        return {"epoch": max(s["epoch"] for s in local), "batches": self.batches, "data_hash": self.data_hash,
                "bad_lines": sum(s["bad_lines"] for s in local), "documents": documents,
                "counts": self.counts.copy(), "shares": dict(zip(self.shares, local))}

    def load_state(self, state):
        self.batches, self.data_hash = state["batches"], state["data_hash"]
        self.counts = np.array(state["counts"], np.int64)
        for p, stream in self.shares.items():
            stream.load_state(state["shares"][p])


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
        self.thread = threading.Thread(target=self._run, args=(stream, n_devices), daemon=True)
        self.thread.start()

    def _run(self, stream, n_devices):
        try:
            while not self.stop.is_set():
                if (item := produce(stream, n_devices)) is None:
                    return self._put(DataError("the training data ran out"))
                self._put(item)
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
        self.thread.join(timeout=10)  # not left inside a call that the interpreter's exit would cut


# ------------------------------------------------------------------------------------------------
# 5. Validation: tokens, token-frequency buckets, loss summary
# ------------------------------------------------------------------------------------------------


def load_validation(sources, enc, seq_len, n_tokens, rows, n_devices=1):
    """The first ~n_tokens tokens of the validation data, unshuffled, as fixed batches of `rows`
    sequences: the same tokens and shapes at every evaluation. -> {"batches", "tokens", "bytes"}."""
    stream = BatchStream(sources, enc, seq_len, batch_size=1, shuffle_buffer=0, loop=False)
    wanted = math.ceil(n_tokens / seq_len)
    sequences = list(itertools.takewhile(lambda s: s is not None,
                                         (stream.next_sequence() for _ in range(wanted))))
    rows = min(rows, len(sequences) // n_devices * n_devices)
    if rows == 0:
        held = sum(map(len, sequences)) + len(stream.pending)
        raise DataError(f"the validation data ({sources[0]}, ...) holds {held} tokens, fewer than {n_devices} "
                        f"sequence(s) of --seq-len + 1 = {seq_len + 1}; pass more --val-data or a lower --seq-len")
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


def bucket_means(losses, which):
    """Mean loss and token count per bucket, `which` giving each token's bucket: (lists of N_BUCKETS)."""
    tokens = np.bincount(which, minlength=N_BUCKETS)
    sums = np.bincount(which, weights=losses, minlength=N_BUCKETS)
    return [float(s / n) if n else None for s, n in zip(sums, tokens)], [int(n) for n in tokens]


def loss_summary(losses, targets, buckets, n_bytes, inputs=None):
    """Per-token losses, their targets (and inputs) -> val_loss (nats/token), val_bpb and the loss per
    frequency bucket of the target token (val_bucket_*: the output side) and of the input token
    (val_input_bucket_*: the side the generator changes). Each view's token-weighted mean is val_loss."""
    losses, targets = np.asarray(losses, np.float64).ravel(), np.asarray(targets).ravel()
    summary = {"val_loss": float(losses.mean()),
               "val_bpb": float(losses.sum() / n_bytes / math.log(2)) if n_bytes else None}
    summary["val_bucket_loss"], summary["val_bucket_tokens"] = bucket_means(losses, buckets[targets])
    if inputs is not None:
        which = buckets[np.asarray(inputs).ravel()]
        summary["val_input_bucket_loss"], summary["val_input_bucket_tokens"] = bucket_means(losses, which)
    return summary


# ------------------------------------------------------------------------------------------------
# 6. Loader throughput (bench.py --loader prints it)
# ------------------------------------------------------------------------------------------------


def loader_throughput(paths, encoding="o200k_base", seq_len=512, batch_size=512, seconds=20.0,
                      max_batches=None, shuffle_buffer=SHUFFLE_BUFFER, seed=0, threads=1):
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

