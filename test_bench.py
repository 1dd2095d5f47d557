"""bench.py: both models timed, the loader measured, the report written, numbers checked."""

import os

import jax
import pytest

import bench
from conftest import HERE, MINIPILE


@pytest.mark.slow
def test_loader_throughput_measures_the_whole_loader(o200k):
    shards = [os.path.join(HERE, MINIPILE, f"{i:02d}.jsonl.zst") for i in (0, 1)]
    result = bench.loader_throughput(shards, "o200k_base", seq_len=64, batch_size=8, seconds=None,
                                     max_batches=5, shuffle_buffer=32)
    assert result["batches"] == 5 and result["tokens"] == 5 * 8 * 65
    assert result["tokens_per_s"] > 1000 and result["fill_seconds"] > 0


# ================================================================================================
# bench.py
# ================================================================================================


@pytest.mark.slow
def test_bench_times_both_models_and_the_loader(capsys, o200k):
    results = bench.main(["--size", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1"])
    out = capsys.readouterr().out
    assert set(results) == {"leviathan", "dense"} and "Leviathan / dense step time:" in out
    for r in results.values():
        assert r["ms_per_step"] > 0 and r["compile_s"] > 0 and 0 < r["generator_share"] < 1.5
        assert r["compiled_mem_gb"] > 0 and r["mfu"] is None  # no known peak on a CPU
    assert results["leviathan"]["params"] == 15_241_152
    loader = bench.main(["--loader", "--seconds", "1", "--seq-len", "64", "--batch-size", "8", "--data",
                         f"{MINIPILE}/val.jsonl.zst"])
    assert loader["tokens_per_s"] > 0 and loader["batches"] >= 1


def test_bench_numeric_flags_refuse_zero_negative_and_non_numbers(capsys):
    numeric = [a.option_strings[0] for a in bench.make_parser()._actions if a.type is not None]
    assert sorted(numeric) == ["--batch-size", "--micro-batch", "--seconds", "--seq-len", "--steps", "--threads"]
    for flag in numeric:
        for value in ("0", "-1", "many")[flag == "--micro-batch":]:  # --micro-batch 0: the whole batch
            with pytest.raises(SystemExit) as exit_:
                bench.main([flag, value])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: must be" in err
    with pytest.raises(SystemExit):
        bench.main(["--batch-size", "8", "--micro-batch", "3"])
    assert "--micro-batch 3 does not divide --batch-size 8" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_report_writes_a_markdown_report(tmp_path, capsys):
    assert [row[0] for row in bench.report_rows("gpu")] == ["60M", "421M"]
    assert all(row[1:3] == (512, 512) and 512 % row[3] == 0 for row in bench.report_rows("gpu"))
    path = tmp_path / "report.md"
    results = bench.main(["--report", "--sizes", "tiny", "--report-file", str(path)])
    text = path.read_text()
    assert set(results) == {"tiny"} and set(results["tiny"]) == {"leviathan", "dense"}
    assert f"JAX {jax.__version__}" in text and "Device: cpu" in text and "## tiny: 8 x 128" in text
    ratio = results["tiny"]["leviathan"]["ms_per_step"] / results["tiny"]["dense"]["ms_per_step"]
    assert f"Leviathan / dense step time: **{ratio:.3f}x**" in text
    assert text in capsys.readouterr().out
