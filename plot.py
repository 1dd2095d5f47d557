"""Compare dense and Leviathan runs: loss curves, scaling fits, rare tokens.

Usage:
    python plot.py RUN_DIR... [--out DIR] [--format png|pdf|svg] [--b 1.69 | --free-b]

A RUN_DIR holds config.json and log.jsonl as written by train.py; any other
folder is searched for run folders below it. Figures and summary.md go to --out
(default: plots/ in the current folder, which git ignores):

    loss_curves    validation loss and the gap (dense minus Leviathan) against tokens
    scaling        final loss against parameters with L(N) = A N^-alpha + b fitted to
                   the dense and the Leviathan runs, and the effective-parameter
                   multiplier N_eff / N next to the paper's reported numbers
    data_scaling   each run's validation curve, with L(D) = B D^-beta + b drawn where
                   it could be fitted
    rare_tokens    validation loss per token-frequency bucket, dense versus Leviathan,
                   bucketed by the target token and, where the logs have
                   val_input_bucket_loss, by the input token as well
    summary.md     the markdown table, then the warnings as notes

b is 1.69 as in the paper unless --b (a finite number >= 0) or --free-b says
otherwise. Runs are paired by (size, seed, --set fields): a run made with
--set gen_knots=8 pairs only with one made with the same --set fields. N is a
run's own parameter count (config "n_params"). Each warning is one sentence, printed once, on stderr; the
table (without the notes) goes to stdout. Legends sit outside the axes, so they
cover no data. Exit status 0 when at least one run was read, 1 when none was, 2
for a bad command line. Needs numpy and matplotlib only.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from machinery import cli  # noqa: E402

PAPER_B = 1.69
PAPER_POINTS = [(109e6, 230e6), (421e6, 725e6)]  # (Leviathan params, dense params with equal loss)
PAPER_RANGE = (1.47, 2.11)  # the paper's effective-parameter multipliers
BUCKET_NAMES = ["0\nmost frequent", "1", "2", "3", "4\nrarest"]
VIEWS = {"val_bucket": "target token", "val_input_bucket": "input token"}  # log field prefix: bucketed by
WARNINGS = []  # every warning of this invocation, repeated as notes in summary.md


class FitError(ValueError):
    """A fit that cannot be made; the message completes a sentence."""


def warn(message):
    WARNINGS.append(message)
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- reading runs

def find_run_dirs(path):
    """`path` itself if it holds config.json, else the run folders below it."""
    path = Path(path)
    if (path / "config.json").is_file():
        return [path]
    if not path.is_dir():
        return []
    return [run for child in sorted(path.iterdir()) if child.is_dir() for run in find_run_dirs(child)]


def read_log(path):
    """Records of log.jsonl sorted by step, keeping the last line of a repeated step."""
    by_step, unreadable = {}, 0
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            unreadable += 1
    return [by_step[step] for step in sorted(by_step)], unreadable


def read_run(run_dir):
    """One run as a dict, or None (after a warning) when its config.json is unusable."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        warn(f"{run_dir}/config.json is not valid JSON, so that run was skipped.")
        return None
    if not isinstance(config, dict) or config.get("model") not in ("dense", "leviathan"):
        warn(f"{run_dir}/config.json does not name model 'dense' or 'leviathan', so it was skipped.")
        return None
    log, unreadable = read_log(run_dir / "log.jsonl")
    if unreadable:
        warn(f"run {run_dir.name} has {unreadable} unreadable line(s) in log.jsonl, which were skipped.")
    evals = [r for r in log if isinstance(r.get("val_loss"), (int, float))]
    if not all(np.isfinite(r["val_loss"]) for r in evals):
        warn(f"run {run_dir.name} has non-finite validation losses, which were left out.")
    return {"name": run_dir.name, "dir": run_dir, "config": config, "model": config["model"],
            "size": str(config.get("size", "?")), "seed": config.get("seed"),
            "n_params": config.get("n_params"), "log": log,
            "evals": [r for r in evals if np.isfinite(r["val_loss"])]}


def load_runs(paths):
    """All runs found under `paths`, named by folder (with its parent if names clash)."""
    dirs = []
    for path in paths:
        found = find_run_dirs(path)
        if not found:
            warn(f"{path} holds no run folder (a folder with config.json).")
        dirs += [d for d in found if d.resolve() not in {x.resolve() for x in dirs}]
    runs = [run for run in map(read_run, dirs) if run]
    names = [run["name"] for run in runs]
    for run in runs:
        if names.count(run["name"]) > 1:
            run["name"] = f"{run['dir'].parent.name}/{run['name']}"
        if not run["evals"]:
            warn(f"run {run['name']} has no validation points, so it has no final loss and no fits.")
    return sorted(runs, key=run_order)


def run_order(run):
    """Smallest first, a pair's two runs together."""
    params = run["config"].get("n_params_dense_twin") or run["n_params"] or 0  # as train.py writes it
    return params, run["size"], str(run["seed"]), run["model"]


def final_loss(run):
    return run["evals"][-1]["val_loss"] if run["evals"] else None


def tokens_seen(run):
    return run["log"][-1].get("tokens") if run["log"] else None


# ---------------------------------------------------------------- matched pairs

def run_variant(run):
    """The run's --set fields as "field=value" words sorted by field ("" for none): train.py records
    them in config.json under "set"; older configs without it count as none."""
    settings = run["config"].get("set")
    return " ".join(f"{field}={settings[field]}" for field in sorted(settings)) if isinstance(settings, dict) else ""


def pair_label(run):
    """A run's identity: size, seed and --set fields. Runs with the same label form a pair."""
    return " ".join(filter(None, [f"{run['size']}/seed {run['seed']}", run_variant(run)]))


def match_pairs(runs):
    """Group runs by (size, seed, --set fields) into pairs; check that each pair saw the same tokens."""
    groups = {}
    for run in runs:
        label = pair_label(run)
        pair = groups.setdefault(label, {"label": label})
        if run["model"] in pair:
            old = pair[run["model"]]
            warn(f"{label} has two {run['model']} runs with the same size, seed and --set fields; "
                 f"{run['name']} replaces {old['name']}.")
            old["pair"] = "replaced"
        pair[run["model"]] = run
    pairs = list(groups.values())
    for colour, pair in zip(plt.cm.tab10.colors * 10, pairs):
        pair["colour"] = colour
        pair["matched"] = check_matched(pair)
        status = {True: "matched", False: "NOT matched", None: "unchecked"}[pair["matched"]]
        for model in ("dense", "leviathan"):
            if model in pair:
                pair[model]["pair"] = status if is_pair(pair) else "unpaired"
                pair[model]["colour"] = colour
    return pairs


def is_pair(pair):
    return "dense" in pair and "leviathan" in pair


def check_matched(pair):
    """True when both runs logged equal data_hash at all common steps, False (warned) when
    not, None when there is nothing to compare."""
    if not is_pair(pair):
        return None
    dense = {r["step"]: r["data_hash"] for r in pair["dense"]["log"] if r.get("data_hash")}
    leviathan = {r["step"]: r["data_hash"] for r in pair["leviathan"]["log"] if r.get("data_hash")}
    common = sorted(dense.keys() & leviathan.keys())
    differing = [step for step in common if dense[step] != leviathan[step]]
    if differing:
        warn(f"pair {pair['label']} saw different tokens at step {differing[0]} (data_hash differs); "
             "it is not a matched comparison.")
        return False
    if not common:
        warn(f"pair {pair['label']} has no data_hash at common steps, so whether it is matched is unchecked.")
        return None
    return True


# ---------------------------------------------------------------- fits

def power_law(x, A, alpha, b):
    return A * np.asarray(x, float) ** -alpha + b


def fit_power_law(x, y, b=PAPER_B, what="x values"):
    """Fit y = A x^-alpha + b (b=None fits b as well). Returns (A, alpha, b)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if b is None:
        return fit_power_law_free_b(x, y, what)
    if len(np.unique(x)) < 2:
        raise FitError(f"it needs two or more distinct {what} (got {len(np.unique(x))})")
    if np.any(y <= b):
        raise FitError(f"a loss of {y.min():.3f} is at or below b = {b:.3g}, where log(L - b) is undefined")
    slope, intercept = np.polyfit(np.log(x), np.log(y - b), 1)  # log(L - b) = log A - alpha log x
    return float(np.exp(intercept)), float(-slope), float(b)


def fit_power_law_free_b(x, y, what):
    """Choose b in [0, min y) minimising the squared loss error of the fit at that b."""
    if len(np.unique(x)) < 3:
        raise FitError(f"with b free it needs three or more distinct {what} (got {len(np.unique(x))})")
    if y.min() <= 0:
        raise FitError("losses must be positive")

    def squared_error(b):
        return float(np.sum((power_law(x, *fit_power_law(x, y, b, what)) - y) ** 2))

    candidates = y.min() * (1 - np.geomspace(1e-6, 1, 300))  # from just below min(y) down to 0
    for _ in range(8):  # grid search, then zoom in around the best b seven times
        i = int(np.argmin([squared_error(b) for b in candidates]))
        lo, hi = candidates[min(i + 1, len(candidates) - 1)], candidates[max(i - 1, 0)]
        candidates = np.linspace(hi, lo, 41)
    return fit_power_law(x, y, candidates[20], what)


def effective_params(loss, A, alpha, b):
    """Size of the dense model that the law L(N) = A N^-alpha + b gives this loss."""
    if loss <= b:
        raise FitError(f"its loss {loss:.3f} is at or below the dense law's floor b = {b:.3g}")
    return (A / (loss - b)) ** (1 / alpha)


def fit_scaling(runs, model, b):
    """L(N) fitted to the final losses of one model's runs, or None after a warning."""
    points = [(r["n_params"], final_loss(r)) for r in runs
              if r["model"] == model and r["n_params"] and r["evals"]]
    try:
        if len({n for n, _ in points}) < 2:
            raise FitError(f"it needs {model} runs with validation points at two or more sizes "
                           f"(got {len({n for n, _ in points})})")
        N, L = np.array(points, float).T
        return fit_power_law(N, L, b, "parameter counts")
    except FitError as error:
        warn(f"no {model} scaling fit L(N): {error}.")


def add_effective_sizes(runs, dense_law):
    """run["n_eff"] and run["multiplier"] for every Leviathan run with a final loss."""
    if dense_law and dense_law[1] <= 0:
        return warn("the dense fit's alpha is not positive (loss does not fall with size), "
                    "so no effective sizes were computed.")
    for run in runs:
        if dense_law and run["model"] == "leviathan" and run["evals"] and run["n_params"]:
            try:
                run["n_eff"] = effective_params(final_loss(run), *dense_law)
                run["multiplier"] = run["n_eff"] / run["n_params"]
            except FitError as error:
                warn(f"run {run['name']} has no effective size: {error}.")


def add_data_fits(runs, b):
    """run["data_law"] = L(D) fitted to the run's validation points with tokens > 0."""
    for run in runs:
        points = [(r["tokens"], r["val_loss"]) for r in run["evals"] if (r.get("tokens") or 0) > 0]
        try:
            if len(points) < 3:
                raise FitError(f"it has {len(points)} validation point(s) after the first token and needs 3")
            run["data_law"] = fit_power_law(*np.array(points, float).T, b, "token counts")
        except FitError as error:
            if run["evals"]:
                warn(f"run {run['name']} has no data-scaling fit L(D): {error}.")


# ---------------------------------------------------------------- token-frequency buckets

def combine_buckets(losses, counts):
    """Token-weighted mean of per-bucket losses (empty or null buckets are left out)."""
    pairs = [(loss, n) for loss, n in zip(losses, counts) if loss is not None and n]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else None


def final_buckets(run, prefix="val_bucket"):
    """(bucket losses, bucket token counts, their weighted mean) of the fields `prefix`_loss and
    `prefix`_tokens at the last eval that has them, or None."""
    for record in reversed(run["evals"]):
        losses, counts = record.get(f"{prefix}_loss"), record.get(f"{prefix}_tokens")
        if losses and counts and len(losses) == len(counts):
            overall = combine_buckets(losses, counts)
            if overall is not None and abs(overall - record["val_loss"]) > 0.01 * record["val_loss"]:
                warn(f"run {run['name']}'s bucket losses by {VIEWS.get(prefix, prefix)} average to "
                     f"{overall:.3f}, not its val_loss {record['val_loss']:.3f}.")
            return losses, counts, overall
    return None


def add_buckets(runs):
    """run["buckets"][prefix] = final_buckets(run, prefix) for each view in VIEWS (None: not logged)."""
    for run in runs:
        run["buckets"] = {prefix: final_buckets(run, prefix) for prefix in VIEWS}


def bucket_bars(buckets):
    """Bar heights: each bucket's loss (nan when empty), then the token-weighted mean."""
    losses, _, overall = buckets
    return np.array([np.nan if loss is None else loss for loss in losses] + [overall], float)


def bucket_rows(pairs, prefix):
    """(pair, dense bars, Leviathan bars) for each pair whose two runs logged `prefix` buckets alike."""
    rows = []
    for pair in filter(is_pair, pairs):
        dense, leviathan = (pair[model].get("buckets", {}).get(prefix) for model in ("dense", "leviathan"))
        if dense and leviathan and len(dense[0]) == len(leviathan[0]):
            rows.append((pair, bucket_bars(dense), bucket_bars(leviathan)))
    return [row for row in rows if len(row[1]) == len(rows[0][1])]


# ---------------------------------------------------------------- figures

def smooth(values, window):
    """Trailing moving average (shorter at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def series(records, key):
    """Arrays (tokens, values) of one logged field, for records with positive tokens."""
    rows = [(r["tokens"], r[key]) for r in records
            if r.get(key) is not None and (r.get("tokens") or 0) > 0]
    return np.array(rows, float).T if rows else (np.array([]), np.array([]))


def pair_gap(pair):
    """(tokens, dense val loss minus Leviathan val loss) at the eval steps both runs have."""
    dense = {r["step"]: r["val_loss"] for r in pair["dense"]["evals"]}
    common = [r for r in pair["leviathan"]["evals"] if r["step"] in dense and (r.get("tokens") or 0) > 0]
    return [r["tokens"] for r in common], [dense[r["step"]] - r["val_loss"] for r in common]


def pair_name(pair):
    return pair["label"] + (" (NOT matched)" if pair["matched"] is False else "")


def new_figure(n_rows, n_cols, size, **kwargs):
    """A figure with constrained layout, so that legends placed outside the axes get room."""
    return plt.subplots(n_rows, n_cols, figsize=size, layout="constrained", **kwargs)


def legend_outside(ax):
    """The axes' legend to the right of it, where it cannot cover data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)


def figure_legend(fig):
    """One legend for all panels, right of them, each label once (the panels share their labels)."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), fontsize=8, loc="outside right upper")


def data_limits(values, margin=0.1):
    """(low, high) around the finite values, widened by `margin` of their spread on each side."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    low, high = values.min(), values.max()
    pad = margin * ((high - low) or abs(high) or 1.0)
    return low - pad, high + pad


def loss_curves_figure(pairs):
    fig, (ax_loss, ax_gap) = new_figure(1, 2, (16, 5.5))
    for pair in pairs:
        for model, style in (("leviathan", "-"), ("dense", "--")):
            if model not in pair:
                continue
            tokens, train = series(pair[model]["log"], "train_loss")
            if len(train):
                train = smooth(train, max(1, len(train) // 20))
                ax_loss.plot(tokens, train, style, color=pair["colour"], alpha=0.25)
            tokens, val = series(pair[model]["evals"], "val_loss")
            label = pair_name(pair) if is_pair(pair) else f"{pair_name(pair)} {model} (unpaired)"
            ax_loss.plot(tokens, val, style, marker=".", color=pair["colour"],
                         label=None if model == "dense" and is_pair(pair) else label)
        if is_pair(pair):
            style = ":" if pair["matched"] is False else "-"
            ax_gap.plot(*pair_gap(pair), style, marker=".", color=pair["colour"], label=pair_name(pair))
    ax_gap.axhline(0, color="black", lw=0.8)
    ax_loss.set(xscale="log", xlabel="tokens seen", ylabel="validation loss (nats/token)",
                title="Validation loss (Leviathan solid, dense dashed; faint: smoothed train loss)")
    ax_gap.set(xscale="log", xlabel="tokens seen", ylabel="dense minus Leviathan val loss (nats/token)",
               title="Leviathan's advantage (above 0: Leviathan is better)")
    for ax in (ax_loss, ax_gap):
        ax.grid(alpha=0.3)
    figure_legend(fig)
    if any(pair["matched"] is False for pair in pairs):
        fig.suptitle("Pairs marked NOT matched saw different training tokens", color="red")
    return fig


def scaling_figure(runs, laws):
    points = [r for r in runs if r["n_params"] and r["evals"]]
    if not points:
        return warn("no run has both a parameter count and a validation loss, so scaling was not drawn.")
    fig, (ax, ax_mult) = new_figure(1, 2, (18, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    ours = [r["n_params"] for r in points] + [r["n_eff"] for r in points if "n_eff" in r]
    for model, marker, colour, style in (("dense", "o", "C0", "-"), ("leviathan", "*", "C3", "--")):
        mine = [r for r in points if r["model"] == model]
        ax.scatter([r["n_params"] for r in mine], [final_loss(r) for r in mine], marker=marker,
                   s=90, color=colour, zorder=3, label=f"{model} runs")
        if laws[model]:
            grid = np.geomspace(min(ours) / 1.3, max(ours) * 1.3, 100)
            A, alpha, b = laws[model]
            ax.plot(grid, power_law(grid, *laws[model]), style, color=colour,
                    label=f"{model} fit: {A:.3g} N^-{alpha:.3f} + {b:.3g}")
    for run in points:
        if "n_eff" in run:
            ax.plot([run["n_params"], run["n_eff"]], [final_loss(run)] * 2, ":", color="C3")
            ax.annotate(f"{run['multiplier']:.2f}x", (run["n_eff"], final_loss(run)), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    if laws["dense"]:
        draw_paper_on_dense_law(ax, laws["dense"], min(ours) / 1.3)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss (nats/token)",
           title=scaling_title(laws, any("n_eff" in r for r in points)))
    draw_multipliers(ax_mult, points)
    for a in (ax, ax_mult):
        a.grid(alpha=0.3)
        legend_outside(a)
    return fig


def scaling_title(laws, has_n_eff):
    """The scaling panel's title, naming only what is drawn."""
    title = "Final loss against parameters"
    if laws["dense"] or laws["leviathan"]:
        title += "\nlines: L(N) = A N^-alpha + b"
    if has_n_eff:
        title += "; dotted: Leviathan -> dense size with equal loss"
    return title


def draw_paper_on_dense_law(ax, dense_law, n_min):
    """The paper's two Leviathan points, placed where our dense law puts their dense equivalents."""
    grid = np.geomspace(n_min, PAPER_POINTS[-1][1] * 1.2, 100)
    ax.plot(grid, power_law(grid, *dense_law), ":", color="gray", lw=1, label="our dense fit, extrapolated")
    for i, (n, n_eff) in enumerate(PAPER_POINTS):
        loss = power_law(n_eff, *dense_law)
        ax.plot([n, n_eff], [loss, loss], ":", color="gray")
        ax.scatter([n], [loss], marker="D", facecolors="none", edgecolors="gray", s=50, zorder=3,
                   label="paper: 109M ~ 230M, 421M ~ 725M dense (on our fit)" if i == 0 else None)


def draw_multipliers(ax, points):
    ax.axhspan(*PAPER_RANGE, color="gray", alpha=0.2, label="paper's range 1.47-2.11x")
    ax.axhline(1, color="black", lw=0.8, label="no gain (1x)")
    for i, (n, n_eff) in enumerate(PAPER_POINTS):
        ax.scatter([n], [n_eff / n], marker="D", facecolors="none", edgecolors="gray", s=50,
                   label="paper's two reported points" if i == 0 else None)
        ax.annotate(f"{n / 1e6:.0f}M -> {n_eff / 1e6:.0f}M", (n, n_eff / n), xytext=(0, -14),
                    textcoords="offset points", fontsize=8, color="gray", ha="center")
    ours = [r for r in points if "multiplier" in r]
    ax.scatter([r["n_params"] for r in ours], [r["multiplier"] for r in ours], marker="*", s=90,
               color="C3", zorder=3, label="our Leviathan runs")
    if not ours:
        ax.text(0.5, 0.5, "no multiplier yet: needs a dense fit\nand Leviathan final losses",
                transform=ax.transAxes, ha="center", color="gray")
    ax.margins(x=0.15)  # room for the paper points' labels
    ax.set(xscale="log", xlabel="Leviathan parameters N", ylabel="effective-parameter multiplier N_eff / N",
           title="Effective-parameter multiplier N_eff / N, ours against the paper's")


def data_scaling_figure(pairs):
    runs = [pair[m] for pair in pairs for m in ("leviathan", "dense") if m in pair and pair[m]["evals"]]
    if not runs:
        return warn("no run has validation points, so data_scaling was not drawn.")
    fig, ax = new_figure(1, 1, (12, 5.5))
    for run in runs:
        style, marker = ("-", "*") if run["model"] == "leviathan" else ("--", "o")
        tokens, val = series(run["evals"], "val_loss")
        label = f"{run['name']} ({run['model']})"
        if "data_law" in run:
            grid = np.geomspace(tokens.min(), tokens.max(), 100)
            ax.plot(grid, power_law(grid, *run["data_law"]), style, color=run["colour"], lw=1,
                    gid=f"L(D) fit: {run['name']}")
            label += f": beta = {run['data_law'][1]:.3f}"
        else:
            label += ": no fit"
        ax.scatter(tokens, val, marker=marker, color=run["colour"], s=25, label=label)
    title = "Data scaling: validation loss against tokens seen (Leviathan stars, dense dots)"
    if any("data_law" in run for run in runs):
        title += "\nlines: L(D) = B D^-beta + b fitted to the run (Leviathan solid, dense dashed)"
    ax.set(xscale="log", xlabel="tokens seen D", ylabel="validation loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def rare_tokens_figure(pairs):
    """Per-bucket losses and gaps, one column per view (target token, input token) that was logged."""
    views = {prefix: rows for prefix in VIEWS if (rows := bucket_rows(pairs, prefix))}
    if not views:
        return warn("no dense/Leviathan pair has per-bucket validation losses, so rare_tokens was not drawn.")
    left_out = [pair_name(row[0]) for row in bucket_rows(pairs, "val_bucket")
                if "val_input_bucket" in views and row[0] not in [r[0] for r in views["val_input_bucket"]]]
    if left_out:
        warn(f"pair(s) {', '.join(left_out)} have no input-token buckets in their logs, "
             "so rare_tokens' input-token panels leave them out.")
    fig, axes = new_figure(2, len(views), (7.5 * len(views) + 2.5, 9.5), squeeze=False)
    for (ax, ax_gap), (prefix, rows) in zip(axes.T, views.items()):
        draw_buckets(ax, ax_gap, rows, VIEWS[prefix])
    figure_legend(fig)
    if "val_input_bucket" not in views:
        fig.suptitle("By target token only: these logs have no input-token buckets (val_input_bucket_loss)")
    return fig


def draw_buckets(ax, ax_gap, rows, view):
    """Dense and Leviathan bars per bucket (y axis fitted to them), and their difference below."""
    n_buckets = len(rows[0][1]) - 1
    names = (BUCKET_NAMES if n_buckets == 5 else [str(i) for i in range(n_buckets)]) + ["all\n(weighted)"]
    x, width = np.arange(n_buckets + 1) - 0.4, 0.8 / (2 * len(rows))
    for i, (pair, dense, leviathan) in enumerate(rows):
        colour, left = pair["colour"], x + 2 * i * width
        ax.bar(left, dense, width, align="edge", color=colour, alpha=0.4, hatch="//")
        ax.bar(left + width, leviathan, width, align="edge", color=colour, label=pair_name(pair))
        ax_gap.bar(left, dense - leviathan, 2 * width, align="edge", color=colour, label=pair_name(pair),
                   hatch="//" if pair["matched"] is False else None)
    ax_gap.axhline(0, color="black", lw=0.8)
    ax.set_ylim(*data_limits([row[1:] for row in rows]))
    ax.set(ylabel="validation loss (nats/token)",
           title=f"By {view}: loss per frequency bucket (pale hatched: dense, solid: Leviathan)")
    ax_gap.set(ylabel="dense minus Leviathan (nats/token)",
               title=f"By {view}: Leviathan's advantage per bucket (above 0: better)")
    for a in (ax, ax_gap):
        a.set_xticks(x + 0.4, names)
        a.set_xlabel(f"{view}'s frequency bucket (by frequency rank in the training stream)")
        a.grid(alpha=0.3, axis="y")


def save(fig, path):
    """Write the figure (None: not drawn) and return its path."""
    if fig is None:
        return None
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- table

def short_count(n):
    """109000000 -> '109M'."""
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def number(value, digits=4):
    return "-" if value is None else f"{value:.{digits}g}"


def summary_markdown(runs, pairs, laws):
    """The table and the fits under it; the warnings are not part of it (see notes_markdown)."""
    header = ["run", "model", "size", "seed", "params", "tokens", "final val loss", "val bpb",
              "effective params", "multiplier", "alpha (params)", "beta (tokens)", "pair"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        last = run["evals"][-1] if run["evals"] else {}
        law, data_law = laws[run["model"]], run.get("data_law")
        cells = [run["name"], run["model"], run["size"], str(run["seed"]), short_count(run["n_params"]),
                 short_count(tokens_seen(run)), number(last.get("val_loss")), number(last.get("val_bpb")),
                 short_count(run.get("n_eff")), f"{run['multiplier']:.2f}x" if "multiplier" in run else "-",
                 number(law and law[1], 3), number(data_law and data_law[1], 3), run.get("pair", "unpaired")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for model in ("dense", "leviathan"):
        law = laws[model]
        lines.append(f"- {model} law: L(N) = {law[0]:.4g} N^-{law[1]:.4f} + {law[2]:.4g}" if law
                     else f"- {model} law: not fitted (a warning says why)")
    if laws["dense"] and laws["leviathan"]:
        bigger = "larger" if laws["leviathan"][1] > laws["dense"][1] else "not larger"
        same_b = laws["leviathan"][2] == laws["dense"][2]
        lines.append(f"- exponents: Leviathan alpha {laws['leviathan'][1]:.4f} vs dense "
                     f"{laws['dense'][1]:.4f} ({bigger}; the paper reports a larger Leviathan exponent"
                     + (")" if same_b else "; the fits' b differ, so compare with care)"))
    for model in ("dense", "leviathan"):
        betas = [r["data_law"][1] for r in runs if r["model"] == model and "data_law" in r]
        if betas:
            lines.append(f"- {model} data exponent beta: mean {np.mean(betas):.4f} over {len(betas)} run(s)")
    lines += bucket_gap_lines(pairs)
    lines.append("- paper reference: Leviathan 109M ~ 230M dense (2.11x), 421M ~ 725M dense (1.72x); "
                 "multipliers 1.47-2.11x")
    return "\n".join(lines)


def bucket_gap_lines(pairs):
    """One line per view and pair: dense minus Leviathan loss in each bucket, then overall."""
    lines = []
    for prefix, view in VIEWS.items():
        for pair, dense, leviathan in bucket_rows(pairs, prefix):
            gaps = " ".join("-" if np.isnan(gap) else f"{gap:+.3f}" for gap in dense - leviathan)
            lines.append(f"- {pair_name(pair)}: dense minus Leviathan per {view} bucket "
                         f"(frequent to rare, then all): {gaps}")
    return lines


def notes_markdown():
    """The warnings of this invocation as markdown notes, for summary.md."""
    return "".join(f"- note: {message}\n" for message in WARNINGS)


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = cli.OneLineParser(prog="plot.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, or folders that contain run folders")
    parser.add_argument("--out", default="plots", help="output folder")
    parser.add_argument("--format", choices=["png", "pdf", "svg"], default="png", help="figure format")
    parser.add_argument("--b", type=cli.number(0, whole=False), default=PAPER_B,
                        help="the fits' fixed loss floor, a finite number >= 0 (default 1.69)")
    parser.add_argument("--free-b", action="store_true", help="fit b too instead of --b's fixed floor")
    return parser.parse_args(argv)


def analyse(paths, b):
    """(runs, pairs, laws): the runs under `paths`, paired, fitted and with their final buckets."""
    runs = load_runs(paths)
    pairs = match_pairs(runs)
    laws = {model: fit_scaling(runs, model, b) for model in ("dense", "leviathan")}
    add_effective_sizes(runs, laws["dense"])
    add_data_fits(runs, b)
    add_buckets(runs)
    return runs, pairs, laws


def main(argv=None):
    args = parse_args(argv)
    WARNINGS.clear()
    runs, pairs, laws = analyse(args.runs, None if args.free_b else args.b)
    if not runs:
        print(f"error: found no readable run folder (config.json + log.jsonl) in {' '.join(args.runs)}.",
              file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"loss_curves": lambda: loss_curves_figure(pairs),
               "scaling": lambda: scaling_figure(runs, laws),
               "data_scaling": lambda: data_scaling_figure(pairs),
               "rare_tokens": lambda: rare_tokens_figure(pairs)}
    written = [save(draw(), out / f"{name}.{args.format}") for name, draw in figures.items()]
    table = summary_markdown(runs, pairs, laws)
    (out / "summary.md").write_text(table + "\n" + ("\n" + notes_markdown() if WARNINGS else ""))
    print(table)  # the warnings were printed on stderr as they came; summary.md keeps them as notes
    for path in filter(None, written):
        print(f"wrote {path}")
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
