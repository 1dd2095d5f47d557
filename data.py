"""The data pipeline: Pile shards (local files or HTTP) -> tokens -> packed, shuffled batches.

    stream = BatchStream(resolve_sources(["corpus/minipile"], "--data"), tokenizer("o200k_base"),
                         seq_len=512, batch_size=512)
    tokens = stream.next_batch()          # (512, 513) int32: inputs and next-token targets
    state = stream.state()                # goes into a checkpoint; load_state(state) continues exactly

The file reads top to bottom:

  1. Sources: files, globs, folders, URLs; tokenizers
  2. Reading shards: local files or HTTP (reconnecting mid-shard), zstd frames, lines, text files
  3. The batch stream: documents -> tokens -> packed sequences -> shuffle buffer -> batches.
     A state machine whose state goes into every checkpoint, so a resumed run sees the same batches.
     The tally of what training consumed: data_hash and the count of every token.
  4. The background loader
  5. Validation tokens

Nothing here depends on the model, so a Leviathan run and its dense twin see identical batches.
"""

import codecs
import glob
import hashlib
import itertools
import json
import math
import os
import queue
import threading

import numpy as np
import zstandard

import tiktoken

import leviathan as lv
from machinery.cli import DataError, UserError
from machinery.http_reader import HTTPReader

PILE = "https://huggingface.co/datasets/monology/pile-uncopyrighted/resolve/main"
DEFAULT_DATA = [f"{PILE}/train/{i:02d}.jsonl.zst" for i in range(30)]
DEFAULT_VAL = [f"{PILE}/val.jsonl.zst"]
SHUFFLE_BUFFER = 10_000  # sequences in the shuffle buffer (paper: 10,000)

# ------------------------------------------------------------------------------------------------
# 1. Sources
# ------------------------------------------------------------------------------------------------


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


def is_url(source):
    return source.startswith(("http://", "https://"))


SHARD_SUFFIXES = (".jsonl", ".jsonl.zst", ".zst")  # JSON lines like the Pile's; any other file is plain text


def is_text(source):
    """True for a plain-text source: every file whose name does not end in .jsonl, .jsonl.zst or .zst
    (book.txt, notes.md, README), and those text files compressed as <name>.txt.zst or <name>.md.zst."""
    name = source.lower()
    return not name.endswith(SHARD_SUFFIXES) or name.removesuffix(".zst").endswith((".txt", ".md", ".text"))


def files_under(folder):
    """Every file below a folder, subfolders included, hidden ones (.name) aside, in sorted order."""
    found = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
             if not name.startswith(".")]
    return sorted(found)


def utf8_text(raw, final=True):
    """Bytes -> str, or UnicodeDecodeError unless they are UTF-8 text without a NUL byte (final=False:
    a character cut at the end of them is fine)."""
    text = raw.decode("utf-8") if final else codecs.getincrementaldecoder("utf-8")().decode(raw)
    if "\0" in text:
        raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "a NUL byte")
    return text


def is_binary(path):
    """Whether a local, uncompressed text source is not UTF-8 text: a NUL byte or an invalid sequence
    in its first 64 KB."""
    if is_url(path) or not is_text(path) or path.endswith(".zst"):
        return False
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        utf8_text(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def resolve_sources(specs, flag):
    """Files, globs, folders and URLs -> the list of shards, in order. Missing local files fail here, and
    so does a named file that is not text; a folder's files that are not text are left out, with a note."""
    sources = []
    for spec in specs:
        if is_url(spec) or os.path.isfile(spec):
            if is_binary(spec):
                raise DataError(f"{spec} is not UTF-8 text, so it cannot be trained on; convert it to UTF-8 "
                                "(iconv -t utf-8) or leave it out")
            sources.append(spec)
        elif os.path.isdir(spec):
            if not (found := files_under(spec)):
                raise DataError(f"{flag} folder {spec} holds no file; check the path")
            if binary := [f for f in found if is_binary(f)]:
                print(f"note: {flag} {spec}: left out {len(binary)} file(s) that are not UTF-8 text "
                      f"({', '.join(os.path.relpath(f, spec) for f in binary[:3])}{', ...' if len(binary) > 3 else ''})")
            sources += [f for f in found if f not in binary]
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
                 loop=True, threads=1, share=(0, 1)):
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
                                    "is JSON with a \"text\" string; a file named .jsonl, .jsonl.zst or .zst is "
                                    "read as JSON lines, any other as plain text")
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
        """The text of a plain-text document; None when it is blank. A file that is not UTF-8 text
        (a binary file, or another encoding) is refused rather than trained on as garbage."""
        if not document.strip():
            return None
        try:
            text = utf8_text(document)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.sources[self.shard]} is not UTF-8 text ({e.reason} in a document), so it was "
                            "not trained on; convert it to UTF-8 (iconv -t utf-8) or leave it out") from None
        self.documents["text"] = self.documents.get("text", 0) + 1
        return text

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
        return np.stack(rows)  # (B, T+1)

    def state(self):
        """Everything needed to continue exactly from here. Cheap: pending and the buffer's rows are
        never changed in place, so sharing them is safe."""
        return {"epoch": self.epoch, "shard": self.shard, "line": self.line, "offset": self.offset,
                "bad_lines": self.bad_lines, "documents": dict(self.documents),
                "rng": self.rng.bit_generator.state, "pending": self.pending, "buffer": list(self.buffer)}

    def load_state(self, state):
        if self._lines is not None:
            self._lines.close()
        self._lines = None
        for key in ("epoch", "shard", "line", "offset", "bad_lines"):
            setattr(self, key, state[key])
        self.documents = dict(state["documents"])
        self.rng.bit_generator.state = state["rng"]
        self.pending = np.asarray(state["pending"], np.int32)
        self.buffer = list(state["buffer"])


class Tally:
    """What training has consumed: batches, data_hash (a running hash of every token, so two runs
    can prove they saw the same tokens) and the count of every target id (the evaluation's frequency
    buckets). Kept on the global batch, so it is the same on every process and for both models."""

    def __init__(self, vocab_size):
        self.batches, self.data_hash = 0, "0" * 32
        self.counts = np.zeros(vocab_size, np.int64)  # target tokens consumed, per id

    def add(self, tokens):
        """Count a batch (B, T+1) that training consumes."""
        self.batches += 1
        self.data_hash = chain_hash(self.data_hash, tokens)
        self.counts += np.bincount(tokens[:, 1:].ravel(), minlength=len(self.counts))

    def state(self):
        return {"batches": self.batches, "data_hash": self.data_hash, "counts": self.counts.copy()}

    def load_state(self, state):
        self.batches, self.data_hash = state["batches"], state["data_hash"]
        self.counts = np.array(state["counts"], np.int64)


def unshuffled(sources, enc, seq_len):
    """A stream of the shards' packed sequences in reading order, once through (no buffer, no loop)."""
    return BatchStream(sources, enc, seq_len, batch_size=1, shuffle_buffer=0, loop=False)


def sequences(stream):
    """A stream's packed sequences (seq_len+1,) int32 in reading order, until it ends. (Not
    iter(stream.next_sequence, None): that compares each array with None.)"""
    while (sequence := stream.next_sequence()) is not None:
        yield sequence


def token_sequences(sources, enc, seq_len):
    """Packed sequences (seq_len+1,) int32 of shards (paths or URLs) in reading order, once through."""
    return sequences(unshuffled(sources, enc, seq_len))


# ------------------------------------------------------------------------------------------------
# 4. The background loader
# ------------------------------------------------------------------------------------------------


class Loader:
    """Runs a stream (BatchStream or Shares) in a background thread, up to `depth` batches ahead of
    training: next(loader) -> (tokens (B, T+1), the stream's state just after them).

    The training loop checkpoints the state that came with the last batch it trained on, so a
    resumed run restarts the stream right after that batch, however far ahead the thread had read,
    and without replaying anything."""

    def __init__(self, stream, depth=8):
        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream):
        try:
            while not self.stop.is_set():
                if (tokens := stream.next_batch()) is None:
                    return self._put(DataError("the training data ran out"))
                self._put((tokens, stream.state()))
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
# 5. Validation tokens
# ------------------------------------------------------------------------------------------------


def load_validation(sources, enc, seq_len, n_tokens, rows, n_devices=1):
    """The first ~n_tokens tokens of the validation data, unshuffled, as fixed batches of `rows`
    sequences: the same tokens and shapes at every evaluation. -> {"batches", "tokens", "bytes"}."""
    stream = unshuffled(sources, enc, seq_len)
    found = list(itertools.islice(sequences(stream), math.ceil(n_tokens / seq_len)))
    rows = min(rows, len(found) // n_devices * n_devices)
    if rows == 0:
        held = sum(map(len, found)) + len(stream.pending)
        raise DataError(f"the validation data ({sources[0]}, ...) holds {held} tokens, fewer than {n_devices} "
                        f"sequence(s) of --seq-len + 1 = {seq_len + 1}; pass more --val-data or a lower --seq-len")
    tokens = np.stack(found[:len(found) // rows * rows])  # (N, T+1)
    ids, counts = np.unique(tokens[:, 1:], return_counts=True)
    # bits per byte count the UTF-8 bytes of the text; EOT, a separator, stands for none
    n_bytes = sum(int(c) * len(enc.decode_single_token_bytes(int(i))) for i, c in zip(ids, counts)
                  if i != enc.eot_token)
    chunks = [tokens[i:i + rows] for i in range(0, len(tokens), rows)]
    # one padded size of distinct ids for every batch: the eval step compiles once
    size = lv.bucket_size(max(len(np.unique(c[:, :-1])) for c in chunks), n_devices)
    batches = [lv.prepare_batch(c, n_devices, size=size) for c in chunks]
    return {"batches": batches, "tokens": int(tokens[:, 1:].size), "bytes": n_bytes}
