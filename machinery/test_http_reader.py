"""machinery/http_reader.py: a shard read over HTTP reconnects where it drops, and is never spliced."""

import os

import numpy as np
import pytest

import data
from machinery import http_reader
from conftest import BYTES, all_batches, words, write_shard


# --- HTTP, against a server on 127.0.0.1 (conftest.ShardServer) ---


def test_http_stream_reconnects_mid_shard_with_range(tmp_path, server):
    path = write_shard(tmp_path / "web.jsonl.zst", words(3000), frames=2)
    size = os.path.getsize(path)
    server.drops, server.drop_after = 2, size // 3  # two drops: at 1/3 and at 2/3 of the file

    def tokens(source):
        stream = data.BatchStream([source], BYTES, 31, 8, shuffle_buffer=0, loop=False)
        return np.concatenate(all_batches(stream))

    from_disk = tokens(path)
    from_http = tokens(f"{server.url}/web.jsonl.zst")
    assert server.starts == [0, size // 3, 2 * (size // 3)]  # resumed where each drop happened
    assert np.array_equal(from_http, from_disk)


def test_http_file_that_changed_is_not_spliced(tmp_path, server):
    path = write_shard(tmp_path / "web.jsonl.zst", words(3000))
    server.drops, server.drop_after = 1, os.path.getsize(path) // 2
    reader = http_reader.HTTPReader(f"{server.url}/web.jsonl.zst")
    assert len(reader.read(1 << 20)) == server.drop_after
    server.version = 2  # the file changes on the server while we read it
    with pytest.raises(data.DataError, match="changed on the server"):
        reader.read(1 << 20)
