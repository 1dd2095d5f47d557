"""Tests of bench.py: flags, the interleaved rounds and their ratio, the FLOP limit, the breakdown, the
report. No timing is asserted: speed is what `python bench.py` prints.

Run: python -m pytest -q test_bench.py
"""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench
import leviathan as lv
from conftest import HERE, MINIPILE


@pytest.mark.slow
def test_loader_throughput_measures_the_whole_loader(o200k):
    shards = [os.path.join(HERE, MINIPILE, f"{i:02d}.jsonl.zst") for i in (0, 1)]
    result = bench.loader_throughput(shards, "o200k_base", seq_len=64, batch_size=8, seconds=None,
                                     max_batches=5, shuffle_buffer=32)
    assert result["batches"] == 5 and result["tokens"] == 5 * 8 * 65
    assert result["tokens_per_s"] > 1000 and result["fill_seconds"] > 0


@pytest.mark.slow
def test_bench_times_both_models_and_the_loader(capsys, o200k):
    results = bench.main(["--size", "tiny", "--batch-size", "2", "--seq-len", "16", "--rounds", "3"])
    out = capsys.readouterr().out
    assert set(results) == {"leviathan", "dense"}
    for r in results.values():
        assert r["ms_per_step"] > 0 and r["compile_s"] > 0 and 0 < r["generator_share"] < 1.5
        assert r["compiled_mem_gb"] > 0 and r["mfu"] is None  # no known peak on a CPU
        assert len(r["rounds_ms"]) == len(r["rounds_cpu_ms"]) == 3 and r["cpu_ms_per_step"] > 0
    assert results["leviathan"]["params"] == 15_241_152
    median, low, high, rounds = bench.ratio_summary(results)
    assert low <= median <= high and rounds == 3
    # the ratio line: the median first, then its spread, the CPU-time ratio and the FLOP limit
    assert f"Leviathan / dense step time: {median:.3f}x (median of 3 interleaved rounds, min {low:.3f}x" in out
    assert f"FLOP limit {results['leviathan']['flop_limit']:.3f}x)" in out
    loader = bench.main(["--loader", "--seconds", "1", "--seq-len", "64", "--batch-size", "8", "--data",
                         f"{MINIPILE}/val.jsonl.zst"])
    assert loader["tokens_per_s"] > 0 and loader["batches"] >= 1


def test_bench_numeric_flags_refuse_zero_negative_and_non_numbers(capsys):
    numeric = [a.option_strings[0] for a in bench.make_parser()._actions if a.type is not None]
    assert sorted(numeric) == ["--batch-size", "--budget", "--micro-batch", "--rounds", "--seconds", "--seq-len",
                               "--steps", "--threads"]
    for flag in numeric:
        zero_means_auto = flag in ("--micro-batch", "--rounds")  # 0: the whole batch; as many as fit --budget
        for value in ("0", "-1", "many")[zero_means_auto:]:
            with pytest.raises(SystemExit) as exit_:
                bench.main([flag, value])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: must be" in err
    with pytest.raises(SystemExit):
        bench.main(["--batch-size", "8", "--micro-batch", "3"])
    assert "--micro-batch 3 does not divide --batch-size 8" in capsys.readouterr().err


def fake_model(name, order):
    """A prepared model whose step only records that it ran."""
    def step(state, batch):
        order.append(name)
        return state, jnp.zeros(())
    return {"state": {}, "batch": {}, "step": step}


def test_interleaved_rounds_alternate_the_order_and_fit_the_budget():
    order = []
    models = [fake_model("a", order), fake_model("b", order)]
    times = bench.interleaved_rounds(models, n_steps=2, rounds=3, budget_s=1.0)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert [len(t) for t in times] == [3, 3]
    assert all(wall >= 0 and cpu >= 0 for t in times for wall, cpu in t)
    order.clear()
    times = bench.interleaved_rounds(models, n_steps=1, rounds=0, budget_s=1e-9)  # nothing fits: the minimum
    assert [len(t) for t in times] == [bench.MIN_ROUNDS] * 2
    times = bench.interleaved_rounds(models, n_steps=1, rounds=0, budget_s=1e9)  # everything fits: the maximum
    assert [len(t) for t in times] == [bench.MAX_ROUNDS] * 2


def test_ratio_summary_is_the_median_of_per_round_ratios():
    results = {"leviathan": {"rounds_ms": [110, 240, 105], "rounds_cpu_ms": [1, 1, 1]},
               "dense": {"rounds_ms": [100, 200, 100], "rounds_cpu_ms": [1, 1, 1]}}
    median, low, high, rounds = bench.ratio_summary(results)  # ratios 1.10, 1.20, 1.05: round by round
    assert (round(median, 6), round(low, 6), round(high, 6), rounds) == (1.1, 1.05, 1.2, 3)
    assert bench.ratio_summary(results, "rounds_cpu_ms") == (1.0, 1.0, 1.0, 3)
    assert "interval" not in bench.ratio_line(results, 1.0)  # 3 rounds: too few for a 95% interval
    six = {m: {key: 2 * r[key] for key in r} for m, r in results.items()}  # each round twice
    line = bench.ratio_line(six, 1.0)
    assert "(median of 6 interleaved rounds, 95% interval of the median 1.050x-1.200x, min" in line


def test_median_interval_is_the_order_statistics_table_and_covers_the_median():
    values = np.random.default_rng(0).permutation(np.arange(1.0, 21.0))  # 1..20, shuffled
    assert bench.median_interval(values) == (6.0, 15.0)  # n = 20: ranks 6 and 15 (95.9%; 7 and 14: 88.5%)
    assert bench.median_interval(np.arange(6.0)) == (0.0, 5.0)  # 6 values: min-max covers 96.9%
    assert bench.median_interval(np.arange(5.0)) is None  # 5 values: min-max covers only 93.8%
    # on a skewed distribution (exponential, median ln 2), 2,000 samples of 20: it covers the median
    samples = np.random.default_rng(1).exponential(size=(2000, 20))
    covered = [low <= np.log(2) <= high for low, high in map(bench.median_interval, samples)]
    # ranks 6 and 15 cover 95.9% (here sd 0.4%); off by one, 7 and 14 cover 88.5%, 5 and 16 98.8%
    assert 0.94 <= np.mean(covered) <= 0.975


@pytest.mark.parametrize("recompute", [False, True])  # sparse_head's heads kept (a CPU) or recomputed
def test_flop_limit_counts_generator_recomputation_and_optimizer(recompute, monkeypatch):
    n_tokens, n_ids = 4 * 512, 1536
    cfgs = [lv.config("60M", model, seq_len=512, sparse_mixing=False) for model in lv.MODELS]  # dense form
    monkeypatch.setattr(lv, "recompute_heads", lambda c: recompute or not lv.uses_sparse_head(c))
    lev, dense = (bench.step_flops(cfg, n_tokens, n_ids) for cfg in cfgs)
    generator = lv.flops_per_step(cfgs[0], 0, n_ids)  # forward and backward: 6 per parameter-id
    optimizer = bench.OPTIMIZER_FLOPS * (lv.count_params(lv.param_shapes(cfgs[0]))
                                         - lv.count_params(lv.param_shapes(cfgs[1])))
    d, G, R, heads = cfgs[0].d_seed, cfgs[0].gen_knots, cfgs[0].gen_rank, cfgs[0].gen_heads
    recomputed = 2 * heads * (d * d + d * G * R) * n_ids  # each head's forward up to its modes, again
    assert lev - dense == pytest.approx(generator + recomputed + optimizer)
    assert optimizer < 0  # the dense table's AdamW is work Leviathan does not do
    assert 1.03 < bench.flop_limit(cfgs, n_tokens, n_ids) < 1.05  # the "about 1.04x" at 60M, 4 x 512
    sparse = dataclasses.replace(cfgs[0], sparse_mixing=True)  # sparse_head: 3 knots forward, dense backward
    per_id = 6 * (d * d + 3 * d * R + R * sparse.d_model) + 4 * d * G * R - 6 * d * R
    per_id += 2 * (d * d + 3 * d * R) if recompute else 0
    sparse_extra = bench.step_flops(sparse, n_tokens, n_ids) - dense
    assert sparse_extra == pytest.approx(heads * per_id * n_ids + optimizer)
    tiny = [lv.config("tiny", model, seq_len=128, sparse_mixing=False) for model in lv.MODELS]
    sparse = [lv.config("tiny", model, seq_len=128) for model in lv.MODELS]
    assert 1.15 < bench.flop_limit(tiny, 16 * 128, n_ids) < 1.2  # the dense form: 32 knots, 4 passes
    assert 1.08 < bench.flop_limit(sparse, 16 * 128, n_ids) < 1.11  # sparse_head: about half the work


def test_bench_mixing_flag_chooses_the_generators_spline_mixing():
    def mixing(*flags):
        args = bench.make_parser().parse_args(["--batch-size", "2", "--seq-len", "16", *flags])
        return [cfg.sparse_mixing for cfg in bench.model_batch(args)[0]]
    assert mixing("--mixing", "sparse") == [True, True] and mixing("--mixing", "dense") == [False, False]
    assert mixing() == [True, True]  # the default on every device


@pytest.mark.slow
def test_bench_breakdown_prints_every_part(capsys):
    cell = bench.main(["--size", "tiny", "--batch-size", "2", "--seq-len", "16", "--breakdown", "--rounds", "1"])
    out = capsys.readouterr().out
    for part, _ in bench.BREAKDOWN_ROWS + [("whole step", "")]:
        assert f"| {part} |" in out
    assert cell["dense"]["body"] == cell["leviathan"]["body"]  # the same work, timed once
    assert "generator" not in cell["dense"] and "table lookup" not in cell["leviathan"]
    for m in cell.values():
        assert m["whole step"][0] > 0
        assert m["rest"][0] == pytest.approx(m["whole step"][0] - m["sum of the parts"][0])


def doubled_rms_norm(x):  # an op of this file around leviathan.py's rms_norm: op_functions' two sources
    return 2.0 * lv.rms_norm(x, jnp.ones(x.shape[-1]), 1e-5)


def repeated_sine(x):  # a while loop: its event spans its body's, so only the body's ops count
    return jax.lax.scan(lambda c, _: (jnp.sin(c) * 1.01, None), x, None, length=50)[0]


def test_op_functions_charges_each_op_to_the_innermost_function_of_a_source():
    text = jax.jit(doubled_rms_norm).lower(jnp.ones((2, 3))).compile().as_text()
    in_leviathan, here = bench.op_functions(text), bench.op_functions(text, source="test_bench.py")
    assert in_leviathan and set(in_leviathan.values()) == {"rms_norm"}
    # rms_norm's ops are charged to their caller in this file: the walk up the stack frames
    assert set(here.values()) == {"doubled_rms_norm"} and set(here) > set(in_leviathan)
    assert not bench.op_functions(text, source="test_leviathan.py")  # a file name, not its ending
    loop = jax.jit(repeated_sine).lower(jnp.ones(3)).compile().as_text()
    whiles = set(re.findall(r"%?([\w.-]+) = [^\n]*\swhile\(", loop))
    sine = re.search(r"%([\w.-]+) = \S+ sine\(", loop).group(1)  # the loop body's op
    control = bench.control_flow_ops(loop)
    assert whiles and whiles <= control and sine not in control
    assert bench.op_functions(loop, source="test_bench.py")[sine] == "repeated_sine.<locals>.<lambda>"


@pytest.mark.slow
def test_bench_profile_charges_the_generator_to_leviathan_alone(capsys):
    ms = bench.main(["--size", "tiny", "--batch-size", "2", "--seq-len", "16", "--profile"])
    out = capsys.readouterr().out
    # sparse_head is a custom_vjp: its ops go to its caller, generator_head
    assert ms["leviathan"]["generator_head"] > 0 and "generator_head" not in ms["dense"]
    for m in ms.values():
        assert m["cross_entropy"] > 0 and m["(wall clock)"] > 0
        assert m["(all ops)"] > m["cross_entropy"]
    assert "| generator_head | 0.0 |" in out and "| (all ops) |" in out


@pytest.mark.slow
def test_bench_report_writes_a_markdown_report(tmp_path, capsys):
    assert [row[0] for row in bench.report_rows("gpu")] == ["60M", "421M"]
    assert all(row[1:3] == (512, 512) and 512 % row[3] == 0 for row in bench.report_rows("gpu"))
    path = tmp_path / "report.md"
    results = bench.main(["--report", "--sizes", "tiny", "--rounds", "3", "--report-file", str(path)])
    text = path.read_text()
    assert set(results) == {"tiny"} and set(results["tiny"]) == {"leviathan", "dense"}
    assert f"JAX {jax.__version__}" in text and "Device: cpu" in text and "## tiny: 8 x 128" in text
    ratio, low, high, rounds = bench.ratio_summary(results["tiny"])
    assert f"Leviathan / dense step time: **{ratio:.3f}x** (median of 3 interleaved rounds" in text
    assert text in capsys.readouterr().out
