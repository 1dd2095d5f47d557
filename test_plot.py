"""plot.py: the fits recover known laws; the figures and the table of pairs, ladders and odd runs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import plot


# ================================================================================================
# plot.py
# ================================================================================================

A, ALPHA, BETA, FLOOR = 400.0, 0.3, 0.5, 1.69  # true law: L = FLOOR + A N^-ALPHA (D_FINAL / D)^BETA
D_FINAL, STEPS = 10_000_000, 10
BUCKET_TOKENS = [400, 300, 150, 100, 50]
BUCKET_OFFSETS = [-1.0, -0.5, 0.5, 1.5, 3.0]  # loss per bucket = val_loss + offset - weighted mean offset


def bucket_losses(val_loss, rare_bonus=0.0):
    """Per-bucket losses whose token-weighted mean is exactly val_loss."""
    offsets = np.array(BUCKET_OFFSETS) - rare_bonus * np.arange(5)
    offsets -= np.dot(offsets, BUCKET_TOKENS) / sum(BUCKET_TOKENS)
    return list(val_loss + offsets)


def write_run(root, name, model, size, n_params, *, seed=0, n_effective=None, beta=BETA,
              eval_every=2, diverge_at=None, resumed=False, input_buckets=False):
    """A run folder whose final val loss is the dense law at n_effective (default n_params); with
    input_buckets its evals also log the input-token buckets (val_input_bucket_loss/_tokens)."""
    run = Path(root) / name
    run.mkdir(parents=True)
    config = {"size": size, "model": model, "seed": seed, "n_params": n_params, "n_params_dense_twin": n_params,
              "tokenizer": "bytes", "batch_size": 8, "seq_len": 128, "config": {"model": model}}
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    for step in range(1, STEPS + 1):
        tokens = step * D_FINAL // STEPS
        loss = FLOOR + A * (n_effective or n_params) ** -ALPHA * (D_FINAL / tokens) ** beta
        record = {"step": step, "tokens": tokens, "train_loss": loss + 0.1, "lr": 1e-3, "grad_norm": 1.0,
                  "tok_per_s": 1e4, "data_hash": f"{step:08x}" + ("ff" if diverge_at and step >= diverge_at else "")}
        if eval_every and step % eval_every == 0:
            record.update(val_loss=loss, val_bpb=loss / math.log(2) / 4, val_bucket_tokens=BUCKET_TOKENS,
                          val_bucket_loss=bucket_losses(loss, 0.3 if model == "leviathan" else 0.0))
            if input_buckets:
                record.update(val_input_bucket_tokens=BUCKET_TOKENS,
                              val_input_bucket_loss=bucket_losses(loss, 0.1 if model == "leviathan" else 0.2))
        lines.append(json.dumps(record))
    if resumed:  # crashed after step 6, resumed from the step-4 checkpoint: steps 5 and 6 logged twice
        stale = [json.dumps({"step": s, "tokens": 1, "train_loss": 99.0}) for s in (5, 6)]
        lines = lines[:4] + stale + lines[4:]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run


def write_pair(root, size, n_params, multiplier, seed=0, diverge_at=None, input_buckets=False):
    """A dense run and a Leviathan run that behaves as a dense one `multiplier` times larger."""
    write_run(root, f"dense_{size}", "dense", size, n_params, seed=seed, diverge_at=diverge_at,
              input_buckets=input_buckets)
    write_run(root, f"leviathan_{size}", "leviathan", size, n_params, seed=seed,
              n_effective=multiplier * n_params, beta=0.6, input_buckets=input_buckets)


def run_plot(capsys, *args):
    """plot.py's main, writing its figures into a "plots" folder beside the first folder given."""
    if "--out" not in args:
        args = (*args, "--out", Path(args[0]) / "plots")
    code = plot.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(stdout):
    """The printed markdown table as a list of {column: cell} dicts."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]


def assert_figures(out, names=("loss_curves", "scaling", "data_scaling", "rare_tokens"), ext="png"):
    for name in names:
        path = out / f"{name}.{ext}"
        assert path.is_file() and path.stat().st_size > 1000, path
    assert "| run |" in (out / "summary.md").read_text()


def test_fit_recovers_known_law_and_n_eff_inverts_it():
    N = np.array([1e6, 3e6, 1e7, 3e7, 1e8])
    A_fit, alpha_fit, b = plot.fit_power_law(N, FLOOR + A * N ** -ALPHA)
    assert A_fit == pytest.approx(A, rel=1e-9) and alpha_fit == pytest.approx(ALPHA, rel=1e-9) and b == FLOOR
    for n in (2e6, 5e7, 7.25e8):
        loss = plot.power_law(n, A_fit, alpha_fit, b)
        assert plot.effective_params(loss, A_fit, alpha_fit, b) == pytest.approx(n, rel=1e-9)


def test_free_b_fit_recovers_the_floor():
    N = np.geomspace(1e6, 1e9, 6)
    A_fit, alpha_fit, b = plot.fit_power_law(N, 1.5 + 50 * N ** -0.25, b=None)
    assert b == pytest.approx(1.5, abs=1e-4)
    assert alpha_fit == pytest.approx(0.25, rel=1e-3) and A_fit == pytest.approx(50, rel=1e-2)


def test_fits_that_cannot_be_made_raise_a_sentence():
    with pytest.raises(plot.FitError, match="at or below b"):
        plot.fit_power_law([1e6, 1e7], [1.5, 1.6])
    with pytest.raises(plot.FitError, match="two or more distinct"):
        plot.fit_power_law([1e6, 1e6], [3.0, 2.9])
    with pytest.raises(plot.FitError, match="three or more"):
        plot.fit_power_law([1e6, 1e7], [3.0, 2.5], b=None)
    with pytest.raises(plot.FitError, match="floor"):
        plot.effective_params(1.6, A, ALPHA, FLOOR)


def test_bucket_losses_recombine_to_the_overall_loss(tmp_path):
    assert plot.combine_buckets([2.0, 4.0, None], [3, 1, 0]) == pytest.approx(2.5)
    assert plot.combine_buckets([None, None], [0, 0]) is None
    run = plot.read_run(write_run(tmp_path, "lev", "leviathan", "1M", 1e6))
    losses, counts, overall = plot.final_buckets(run)
    assert counts == BUCKET_TOKENS and losses[4] > losses[0]
    assert overall == pytest.approx(run["evals"][-1]["val_loss"], rel=1e-12)
    assert plot.bucket_bars((losses, counts, overall))[-1] == overall  # the "all" bar
    run["evals"][-1]["val_bucket_tokens"] = [50, 100, 150, 300, 400]  # weights that no longer fit
    plot.WARNINGS.clear()
    plot.final_buckets(run)
    assert len(plot.WARNINGS) == 1 and "bucket losses by target token average to" in plot.WARNINGS[0]


def test_resumed_log_keeps_the_last_line_of_each_step(tmp_path):
    run = write_run(tmp_path, "r", "dense", "1M", 1e6, resumed=True)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 11, "tok')  # a line cut off by a crash
    log, unreadable = plot.read_log(run / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)) and unreadable == 1
    assert [r["tokens"] for r in log] == [s * D_FINAL // STEPS for s in range(1, STEPS + 1)]


def test_pair_writes_figures_table_and_says_why_scaling_is_not_fitted(tmp_path, capsys):
    write_pair(tmp_path / "runs", "1M", 1_000_000, 2.0)
    code, out, err = run_plot(capsys, tmp_path / "runs", "--out", tmp_path / "plots")
    assert code == 0
    assert_figures(tmp_path / "plots")
    rows = {row["run"]: row for row in table_rows(out)}
    assert set(rows) == {"dense_1M", "leviathan_1M"} and rows["dense_1M"]["pair"] == "matched"
    assert float(rows["leviathan_1M"]["beta (tokens)"]) == pytest.approx(0.6, rel=1e-3)
    assert "no dense scaling fit L(N): it needs dense runs with validation points at two or more sizes" in err
    assert "not a matched comparison" not in err and "Traceback" not in err
    assert all(line.startswith("warning: ") for line in err.splitlines())


def test_ladder_recovers_known_multipliers_and_exponents(tmp_path, capsys):
    multipliers = {"10M": 1.5, "20M": 1.7, "40M": 1.9, "80M": 2.1}
    for size, k in multipliers.items():
        write_pair(tmp_path, size, int(size[:-1]) * 1_000_000, k)
    code, out, err = run_plot(capsys, tmp_path, "--format", "svg")
    assert code == 0 and err == ""
    assert_figures(tmp_path / "plots", ext="svg")
    rows = {row["run"]: row for row in table_rows(out)}
    for size, k in multipliers.items():
        assert rows[f"leviathan_{size}"]["multiplier"] == f"{k:.2f}x"
        assert float(rows[f"dense_{size}"]["beta (tokens)"]) == pytest.approx(BETA, rel=1e-3)
    assert float(rows["dense_10M"]["alpha (params)"]) == pytest.approx(ALPHA, rel=1e-3)
    assert float(rows["leviathan_10M"]["alpha (params)"]) > ALPHA  # the gain grows with size here
    assert "Leviathan alpha" in out and "(larger;" in out


def test_free_b_option_refits_the_floor(tmp_path, capsys):
    for size in ("10M", "20M", "40M", "80M"):
        write_run(tmp_path, f"dense_{size}", "dense", size, int(size[:-1]) * 1_000_000)
    code, out, err = run_plot(capsys, tmp_path, "--free-b")
    assert code == 0
    assert "dense law: L(N) = 400 N^-0.3000 + 1.69" in out


def test_run_without_eval_points_gets_one_sentence_and_other_figures(tmp_path, capsys):
    write_pair(tmp_path, "1M", 1_000_000, 2.0)
    write_pair(tmp_path, "4M", 4_000_000, 2.0)
    write_run(tmp_path, "dense_1M_s1", "dense", "1M", 1_000_000, seed=1, eval_every=0)
    write_run(tmp_path, "leviathan_1M_s1", "leviathan", "1M", 1_000_000, seed=1, eval_every=5)
    code, out, err = run_plot(capsys, tmp_path)
    assert code == 0
    assert "warning: run dense_1M_s1 has no validation points, so it has no final loss and no fits.\n" in err
    assert err.count("dense_1M_s1") == 1
    assert ("warning: run leviathan_1M_s1 has no data-scaling fit L(D): it has 2 validation point(s) "
            "after the first token and needs 3.") in err
    assert_figures(tmp_path / "plots")
    rows = {row["run"]: row for row in table_rows(out)}
    assert rows["dense_1M_s1"]["final val loss"] == "-" and rows["leviathan_1M_s1"]["beta (tokens)"] == "-"
    assert rows["leviathan_4M"]["multiplier"] == "2.00x"


def test_unmatched_pair_is_warned_and_marked(tmp_path, capsys):
    write_pair(tmp_path, "1M", 1_000_000, 2.0, diverge_at=6)
    code, out, err = run_plot(capsys, tmp_path, "--out", tmp_path / "o")
    assert code == 0
    assert ("warning: pair 1M/seed 0 saw different tokens at step 6 (data_hash differs); "
            "it is not a matched comparison.") in err
    assert {row["pair"] for row in table_rows(out)} == {"NOT matched"}
    assert_figures(tmp_path / "o")


def test_loss_at_or_below_the_floor_gets_a_sentence_not_a_traceback(tmp_path, capsys):
    write_pair(tmp_path, "1M", 1_000_000, 2.0)
    write_pair(tmp_path, "4M", 4_000_000, 2.0)
    code, out, err = run_plot(capsys, tmp_path, "--b", "7")
    assert code == 0 and "Traceback" not in err
    assert "warning: no dense scaling fit L(N): a loss of 5.873 is at or below b = 7" in err


def test_empty_or_invalid_folder_exits_1(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    code, out, err = run_plot(capsys, tmp_path)
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("error: found no readable run folder")


def figures(path, b=FLOOR):
    """plot.py's four figures (None where one is not drawn) for the runs under `path`."""
    runs, pairs, laws = plot.analyse([path], b)
    return {"loss_curves": plot.loss_curves_figure(pairs), "scaling": plot.scaling_figure(runs, laws),
            "data_scaling": plot.data_scaling_figure(pairs), "rare_tokens": plot.rare_tokens_figure(pairs)}


def points_under_legends(fig):
    """Display positions of drawn data (line vertices, scatter points, bar tops) that a legend covers."""
    fig.canvas.draw()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    boxes = [legend.get_window_extent() for legend in legends]
    covered = []
    for ax in fig.axes:
        xys = [line.get_transform().transform(line.get_xydata()) for line in ax.lines]
        xys += [points.get_offset_transform().transform(points.get_offsets()) for points in ax.collections]
        xys += [ax.transData.transform([(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height())
                                        for bar in bars]) for bars in ax.containers]
        visible = ax.get_window_extent()
        covered += [tuple(p) for xy in xys for p in xy
                    if visible.contains(*p) and any(box.contains(*p) for box in boxes)]
    return covered


@pytest.mark.parametrize("scene", ["pair like results/tiny-minipile", "ladder with input buckets"])
def test_legends_cover_no_data_points(tmp_path, scene):
    if scene.startswith("pair"):  # one dense point, at the largest N and the highest loss: upper right
        write_run(tmp_path, "dense", "dense", "tiny", 2_000_000)
        write_run(tmp_path, "leviathan", "leviathan", "tiny", 1_000_000, n_effective=8_000_000)
    else:
        for size, k in {"10M": 1.5, "20M": 1.7, "40M": 1.9}.items():
            write_pair(tmp_path, size, int(size[:-1]) * 1_000_000, k, input_buckets=True)
    drawn = figures(tmp_path)
    assert all(drawn.values()) and len(drawn["scaling"].axes[0].collections[0].get_offsets()) >= 1  # dense
    for name, fig in drawn.items():
        assert points_under_legends(fig) == [], name
        assert fig.legends or any(ax.get_legend() for ax in fig.axes), name
        plot.plt.close(fig)


def test_data_scaling_draws_a_fit_line_per_fitted_run_and_titles_only_what_is_drawn(tmp_path):
    write_pair(tmp_path / "runs", "1M", 1_000_000, 2.0)
    write_run(tmp_path / "runs", "leviathan_1M_s1", "leviathan", "1M", 1_000_000, seed=1, eval_every=5)
    fig = figures(tmp_path / "runs")["data_scaling"]
    ax = fig.axes[0]
    assert {line.get_gid() for line in ax.lines} == {"L(D) fit: dense_1M", "L(D) fit: leviathan_1M"}
    assert "L(D) = B D^-beta + b" in ax.get_title()
    assert any(label.endswith(": no fit") for label in ax.get_legend_handles_labels()[1])
    write_run(tmp_path / "few", "dense", "dense", "1M", 1_000_000, eval_every=5)  # 2 evals: no fit
    ax = figures(tmp_path / "few")["data_scaling"].axes[0]
    assert len(ax.lines) == 0 and "L(D)" not in ax.get_title()
    plot.plt.close("all")


def test_each_warning_is_printed_once_and_kept_in_summary_md(tmp_path, capsys):
    write_pair(tmp_path, "1M", 1_000_000, 2.0, diverge_at=6)
    write_run(tmp_path, "dense_1M_s1", "dense", "1M", 1_000_000, seed=1, eval_every=0)
    write_run(tmp_path, "leviathan_1M_s1", "leviathan", "1M", 1_000_000, seed=1, eval_every=5)
    code, out, err = run_plot(capsys, tmp_path)
    assert code == 0
    warnings = [line.removeprefix("warning: ") for line in err.splitlines()]
    assert len(warnings) >= 4 and all(line.startswith("warning: ") for line in err.splitlines())
    for message in warnings:
        assert (out + err).count(message) == 1, message
    assert "note:" not in out
    summary = (tmp_path / "plots" / "summary.md").read_text()
    assert all(f"- note: {message}\n" in summary for message in warnings)


def test_bucket_panels_fit_their_data_and_show_the_input_view_when_logged(tmp_path, capsys):
    write_pair(tmp_path / "new", "1M", 1_000_000, 2.0, input_buckets=True)
    fig = figures(tmp_path / "new")["rare_tokens"]
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 4 and sum("By target token" in t for t in titles) == 2
    assert sum("By input token" in t for t in titles) == 2
    for ax in fig.axes:
        if "loss per frequency bucket" in ax.get_title():  # losses near 5-8 nats: no axis from 0
            heights = [bar.get_height() for bars in ax.containers for bar in bars]
            low, high = ax.get_ylim()
            assert 0 < low < min(heights) and max(heights) < high < 1.2 * max(heights)
    plot.plt.close(fig)
    write_pair(tmp_path / "old", "1M", 1_000_000, 2.0)  # logs from before the input buckets
    capsys.readouterr()
    fig = figures(tmp_path / "old")["rare_tokens"]
    assert len(fig.axes) == 2 and not any("input token" in ax.get_title() for ax in fig.axes)
    assert "no input-token buckets" in fig.get_suptitle()
    assert "input" not in capsys.readouterr().err
    plot.plt.close(fig)
    write_pair(tmp_path / "old", "4M", 4_000_000, 2.0, input_buckets=True)  # a mix: one warning
    fig = figures(tmp_path / "old")["rare_tokens"]
    assert len(fig.axes) == 4
    assert len([line for line in capsys.readouterr().err.splitlines() if "input" in line]) == 1
    plot.plt.close(fig)
    code, out, err = run_plot(capsys, tmp_path / "new")
    assert code == 0 and "dense minus Leviathan per input token bucket" in out


@pytest.mark.parametrize("bad", ["-1", "abc", "inf", "nan"])
def test_b_must_be_a_finite_number_at_least_0(tmp_path, capsys, bad):
    write_pair(tmp_path, "1M", 1_000_000, 2.0)
    with pytest.raises(SystemExit) as stopped:
        plot.main([str(tmp_path), "--b", bad])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: argument --b: must be a number of 0 or more, not '{bad}'")
    assert plot.parse_args([str(tmp_path), "--b", "0"]).b == 0.0  # the edge of the range is a floor


@pytest.mark.slow
def test_command_line_runs_headless_without_jax(tmp_path):
    write_pair(tmp_path / "runs", "1M", 1_000_000, 2.0)
    here = Path(plot.__file__).parent
    done = subprocess.run([sys.executable, "plot.py", str(tmp_path / "runs"), "--out", str(tmp_path / "o")],
                          cwd=here, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| leviathan_1M | leviathan |" in done.stdout
    assert (tmp_path / "o" / "loss_curves.png").stat().st_size > 1000
    check = subprocess.run([sys.executable, "-c", "import sys, plot; sys.exit('jax' in sys.modules)"],
                           cwd=here, timeout=60)
    assert check.returncode == 0


# --- runs told apart by size, seed and --set fields: an ablation never replaces another ------------

LAB = Path(__file__).parent / "results" / "lab"


def write_lab_run(folder, model, seed=0, settings=None, size="tiny"):
    """A minimal run folder: config.json (with "set" when given) and a log with two evaluations."""
    folder.mkdir(parents=True)
    config = {"model": model, "size": size, "seed": seed, "n_params": 1000}
    if settings is not None:
        config["set"] = settings
    (folder / "config.json").write_text(json.dumps(config))
    records = [{"step": s, "tokens": 512 * s, "train_loss": 9.0, "val_loss": 9.0 - s / 100,
                "data_hash": f"h{s}"} for s in (25, 50)]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def pairs_of(paths):
    plot.WARNINGS.clear()
    return {pair["label"]: pair for pair in plot.match_pairs(plot.load_runs(paths))}


def test_set_fields_keep_ablations_apart(tmp_path):
    write_lab_run(tmp_path / "leviathan-s0", "leviathan", settings={})
    write_lab_run(tmp_path / "knots8-s0", "leviathan", settings={"gen_knots": 8})
    write_lab_run(tmp_path / "rank16-knots8-s0", "leviathan", settings={"gen_rank": 16, "gen_knots": 8})
    write_lab_run(tmp_path / "dense-s0", "dense", settings={})
    write_lab_run(tmp_path / "dense-rms-s0", "dense", settings={"embed_norm": "rms"})
    write_lab_run(tmp_path / "leviathan-rms-s0", "leviathan", settings={"embed_norm": "rms"})
    write_lab_run(tmp_path / "old-s1", "leviathan", seed=1)  # a config from before "set": no --set fields
    pairs = pairs_of([tmp_path])
    assert not plot.WARNINGS
    assert set(pairs) == {"tiny/seed 0", "tiny/seed 0 gen_knots=8", "tiny/seed 0 gen_knots=8 gen_rank=16",
                          "tiny/seed 0 embed_norm=rms", "tiny/seed 1"}
    assert (pairs["tiny/seed 0"]["leviathan"]["name"], pairs["tiny/seed 0"]["dense"]["name"]) == (
        "leviathan-s0", "dense-s0")
    assert pairs["tiny/seed 0 embed_norm=rms"]["leviathan"]["name"] == "leviathan-rms-s0"
    assert pairs["tiny/seed 0 embed_norm=rms"]["dense"]["name"] == "dense-rms-s0"
    assert pairs["tiny/seed 0 gen_knots=8"]["leviathan"]["pair"] == "unpaired"
    assert pairs["tiny/seed 0"]["leviathan"]["pair"] == "matched"


def test_a_students_run_beside_the_lab_replaces_only_its_own_kind(tmp_path):
    """The issue's case: a student's run drawn beside results/lab. A run with other --set fields is kept
    apart; one with the same size, seed and --set fields is the same kind, and the warning says why."""
    write_lab_run(tmp_path / "tiny-mine", "leviathan", settings={"gen_rank": 4})
    pairs = pairs_of([LAB, tmp_path])
    assert not plot.WARNINGS, plot.WARNINGS
    assert pairs["tiny/seed 0 gen_rank=4"]["leviathan"]["name"] == "tiny-mine"
    assert pairs["tiny/seed 0 gen_knots=8"]["leviathan"]["name"] == "leviathan-knots8-s0"
    write_lab_run(tmp_path / "again" / "leviathan-s0", "leviathan", settings={})
    pairs = pairs_of([LAB, tmp_path / "again"])
    [warning] = plot.WARNINGS
    assert warning.startswith("tiny/seed 0 has two leviathan runs with the same size, seed and --set fields; ")
    assert "again/leviathan-s0" in warning and "lab/leviathan-s0" in warning


def test_the_committed_lab_forms_its_pairs_without_a_warning():
    pairs = pairs_of([LAB])
    assert not plot.WARNINGS, plot.WARNINGS
    assert len(pairs) == 2 * 7  # per seed: as built, embed_norm=rms (pairs); 5 Leviathan or dense ablations
    for seed in (0, 1):
        for label in (f"tiny/seed {seed}", f"tiny/seed {seed} embed_norm=rms"):
            assert pairs[label]["leviathan"]["pair"] == pairs[label]["dense"]["pair"] == "matched"
        assert "leviathan" not in pairs[f"tiny/seed {seed} embed_init_std=0.21"]
