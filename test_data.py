"""data.py: documents, packing, the shuffle buffer and its state, text files, the loader, validation."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

import data
from conftest import BYTES, EOT, all_batches, doc, drain, words, write_shard
from machinery import run_folder


# --- the pipeline ----------------------------------------------------------------------------------


def test_documents_end_with_eot_and_pack_into_sequences(tmp_path):
    lines = [doc("abc"), "{not json", doc("de", "Other"), {"text": 5}, "", doc("fghij")]
    path = write_shard(tmp_path / "a.jsonl.zst", lines, frames=3)
    stream = data.BatchStream([path], BYTES, seq_len=3, batch_size=1, shuffle_buffer=0, loop=False)
    sequences = drain(stream.next_sequence)
    tokens = [*b"abc", EOT, *b"de", EOT, *b"fghij", EOT]  # 13 tokens: 3 sequences of 4, 1 left over
    assert [s.tolist() for s in sequences] == [tokens[0:4], tokens[4:8], tokens[8:12]]
    assert all(s.dtype == np.int32 for s in sequences)
    assert stream.bad_lines == 2  # "{not json" and a non-string text; the blank line is not counted
    assert stream.documents == {"Test": 2, "Other": 1}


def test_truncated_and_corrupt_zstd_are_errors_not_silent_ends(tmp_path):
    good = write_shard(tmp_path / "good.jsonl.zst", words(300), frames=2)
    blob = open(good, "rb").read()
    (tmp_path / "cut.jsonl.zst").write_bytes(blob[:-5])
    (tmp_path / "bad.jsonl.zst").write_bytes(blob[:50] + bytes(200) + blob[250:])
    assert len(list(data.shard_lines(good))) == 300
    with pytest.raises(data.DataError, match=r"cut\.jsonl\.zst is truncated"):
        list(data.shard_lines(str(tmp_path / "cut.jsonl.zst")))
    with pytest.raises(data.DataError, match=r"bad\.jsonl\.zst is corrupt"):
        list(data.shard_lines(str(tmp_path / "bad.jsonl.zst")))


def test_long_documents_are_encoded_in_pieces_under_the_limit(tmp_path, monkeypatch):
    text = "alpha beta gamma\ndelta epsilon zeta"
    pieces = data.split_text(text, 10)
    assert "".join(pieces) == text and all(len(p) <= 10 for p in pieces)
    assert all(p[0] in " \n" for p in pieces[1:])  # cut before whitespace, not inside a word
    assert data.split_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no whitespace: hard cut

    class Recording:  # an encoding that checks what the tokenizer is handed
        eot_token, seen = EOT, []

        def encode_ordinary(self, piece):
            self.seen.append(len(piece))
            return BYTES.encode_ordinary(piece)

    monkeypatch.setattr(data, "MAX_CHARS", 10)
    path = write_shard(tmp_path / "long.jsonl", [doc(text)])
    stream = data.BatchStream([path], Recording(), len(text), 1, shuffle_buffer=0,
                               loop=False)
    assert stream.next_sequence().tolist() == [*text.encode(), EOT]
    assert max(Recording.seen) <= 10 and len(Recording.seen) == len(pieces)


def test_shuffle_buffer_is_seeded_and_loses_no_sequence(tmp_path):
    path = write_shard(tmp_path / "s.jsonl", [doc(f"doc{i:04d}") for i in range(200)])  # 8 tokens each

    def batches(seed, shuffle):
        stream = data.BatchStream([path], BYTES, 7, 4, seed=seed, shuffle_buffer=shuffle, loop=False)
        return all_batches(stream)

    plain, a, again, other = batches(0, 0), batches(0, 16), batches(0, 16), batches(1, 16)
    assert len(plain) == len(a) == 50 and all(b.shape == (4, 8) for b in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))  # same seed, same order
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))  # another seed, another order
    assert not all(np.array_equal(x, y) for x, y in zip(a, plain))  # shuffled at all
    rows = lambda bs: sorted(map(tuple, np.concatenate(bs).tolist()))  # noqa: E731
    assert rows(a) == rows(plain)  # the buffer drains at the end: every sequence comes out once


def test_loader_state_resumes_the_stream_exactly(tmp_path, monkeypatch):
    """The state attached to batch k, saved in a checkpoint file with the tally and loaded into a new
    stream, continues with batch k+1 -- mid-shard, mid-frame, across shards and epochs -- with the same
    hash and counts."""
    monkeypatch.setattr(data, "GROUP_CHARS", 300)  # read in small groups, so positions fall mid-shard
    shards = [write_shard(tmp_path / f"{i}.jsonl.zst", words(15, seed=i), frames=3) for i in range(2)]

    def make():
        return data.BatchStream(shards, BYTES, 15, 3, seed=3, shuffle_buffer=10)

    reference, tally = make(), data.Tally(257)
    expected = [reference.next_batch() for _ in range(120)]
    tallied = []  # the tally's state after each batch
    for tokens in expected:
        tally.add(tokens)
        tallied.append(tally.state())
    assert reference.epoch >= 1  # the run went round the shards more than once
    loader = data.Loader(make(), depth=4)
    items = [next(loader) for _ in range(100)]
    loader.close()
    for k in (1, 17, 55, 100):
        tokens, state = items[k - 1]
        assert np.array_equal(tokens, expected[k - 1])
        path = str(tmp_path / "ckpt.npz")
        run_folder.save_checkpoint(path, {"w": np.ones(3, np.float32)},
                                   {"stream": state, "tally": tallied[k - 1]}, {"step": k})
        meta, leaves, loaded = run_folder.load_checkpoint(path)
        assert meta["step"] == k and np.array_equal(leaves[0], np.ones(3))
        resumed, tally = make(), data.Tally(257)
        resumed.load_state(loaded["stream"])
        tally.load_state(loaded["tally"])
        for tokens in expected[k:]:
            assert np.array_equal(resumed.next_batch(), tokens)
            tally.add(tokens)
        assert tally.data_hash == tallied[-1]["data_hash"] != "0" * 32
        assert np.array_equal(tally.counts, tallied[-1]["counts"])


def test_a_closed_loader_stops_reading_at_once(tmp_path):
    """close() ends the thread after the batch it is making, instead of reading the rest of the data
    (every run used to wait 10 s at its end, while the thread tokenized on)."""
    path = write_shard(tmp_path / "s.jsonl", words(5000))
    read = []

    class Counting(data.BatchStream):
        def next_batch(self):
            read.append(1)
            return super().next_batch()

    loader = data.Loader(Counting([path], BYTES, 15, 2, shuffle_buffer=0, loop=True), depth=2)
    next(loader)
    t0 = time.monotonic()
    loader.close()
    assert not loader.thread.is_alive() and time.monotonic() - t0 < 2
    before = len(read)
    time.sleep(0.3)
    assert len(read) == before <= 5  # the one taken, the queue's two, one being put, one being made


def test_text_files_and_folders_are_documents(tmp_path, capsys):
    """Any file that is not a JSON-lines shard (.jsonl, .jsonl.zst, .zst) is plain text, whatever its
    name; a folder's files that are not UTF-8 text are left out with a note."""
    (tmp_path / "notes" / "deep").mkdir(parents=True)
    (tmp_path / "notes" / "b.md").write_text("# Title\n\nsecond")
    (tmp_path / "notes" / "deep" / "a.txt").write_text("first")
    (tmp_path / "notes" / "README").write_text("third")
    (tmp_path / "notes" / "skip.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "notes" / "blank.txt").write_text("\n\n")
    sources = data.resolve_sources([str(tmp_path / "notes")], "--data")
    assert [os.path.relpath(s, tmp_path / "notes") for s in sources] == [
        "README", "b.md", "blank.txt", os.path.join("deep", "a.txt")]
    assert capsys.readouterr().out == "note: --data " + str(tmp_path / "notes") + ": left out 1 file(s) that are " \
        "not UTF-8 text (skip.png)\n"
    stream = data.BatchStream(sources, BYTES, seq_len=100, batch_size=1, shuffle_buffer=0, loop=False)
    stream.next_sequence()
    assert stream.pending.tolist() == [*b"third", EOT, *b"# Title\n\nsecond", EOT, *b"first", EOT]  # a file is a document
    assert stream.documents == {"text": 3} and stream.bad_lines == 0


def test_a_file_that_is_not_text_is_refused(tmp_path):
    (tmp_path / "picture.txt").write_bytes(b"\x89PNG\r\n" + bytes(range(256)))
    with pytest.raises(data.DataError, match="picture.txt is not UTF-8 text, so it cannot be trained on"):
        data.resolve_sources([str(tmp_path / "picture.txt")], "--data")
    (tmp_path / "latin1.txt").write_bytes(b"plain ascii " * 6000 + "caf\xe9".encode("latin-1"))  # past 64 KB
    stream = data.BatchStream(data.resolve_sources([str(tmp_path / "latin1.txt")], "--data"), BYTES, 16, 1)
    with pytest.raises(data.DataError, match="latin1.txt is not UTF-8 text .* convert it to UTF-8"):
        stream.next_batch()


def test_a_big_text_file_is_cut_at_blank_lines_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TEXT_DOCUMENT", 12)
    monkeypatch.setattr(data, "GROUP_CHARS", 1)  # tokenize one document at a time
    paragraphs = ["one two three", "four\nfive", "six seven eight nine", "ten"]
    path = str(tmp_path / "book.txt")
    Path(path).write_text("\n\n".join(paragraphs) + "\n")
    documents = [d for d, _ in data.text_documents(path)]
    assert documents == [b"one two three", b"four\nfive\n\nsix seven eight nine", b"ten"]
    whole = data.BatchStream([path], BYTES, seq_len=7, batch_size=1, shuffle_buffer=0, loop=False)
    expected = drain(whole.next_sequence)
    part = data.BatchStream([path], BYTES, seq_len=7, batch_size=1, shuffle_buffer=0, loop=False)
    first = [part.next_sequence() for _ in range(2)]
    resumed = data.BatchStream([path], BYTES, seq_len=7, batch_size=1, shuffle_buffer=0, loop=False)
    resumed.load_state(part.state())
    assert 0 < resumed.offset < os.path.getsize(path)  # stopped inside the file, at a document's end
    assert [s.tolist() for s in first + drain(resumed.next_sequence)] == [s.tolist() for s in expected]


def test_short_validation_text_says_how_many_tokens_it_holds(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("too short")
    with pytest.raises(data.DataError, match=r"holds 10 tokens, fewer than 1 sequence\(s\) of --seq-len \+ 1 = 65"):
        data.load_validation([str(path)], BYTES, 64, 1000, rows=4)
