"""Compare dense and Leviathan runs: loss curves, scaling fits, rare tokens.

Usage:
    python plot.py RUN_DIR... [--out DIR] [--format png|pdf|svg] [--b 1.69 | --free-b]

A RUN_DIR holds config.json and log.jsonl as written by train.py; any other
folder is searched for run folders below it. Figures and summary.md go to --out
(default: a "plots" folder next to the first run folder found):

    loss_curves    validation loss and the gap (dense minus Leviathan) against tokens
    scaling        final loss against parameters with L(N) = A N^-alpha + b fitted to
                   the dense and the Leviathan runs, and the effective-parameter
                   multiplier N_eff / N next to the paper's reported numbers
    data_scaling   L(D) = B D^-beta + b fitted to each run's validation curve
    rare_tokens    validation loss per token-frequency bucket, dense versus Leviathan
    summary.md     the markdown table that is also printed

b is 1.69 as in the paper unless --b or --free-b says otherwise. Runs are paired
by (size, seed). N is a run's own parameter count (config "n_params"). Warnings
are one sentence each on stderr; the table goes to stdout. Exit status 0 when at
least one run was read, 1 otherwise. Needs numpy and matplotlib only.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PAPER_B = 1.69
PAPER_POINTS = [(109e6, 230e6), (421e6, 725e6)]  # (Leviathan params, dense params with equal loss)
PAPER_RANGE = (1.47, 2.11)  # the paper's effective-parameter multipliers
BUCKET_NAMES = ["0\nmost frequent", "1", "2", "3", "4\nrarest"]
WARNINGS = []  # every warning of this invocation, repeated in summary.md


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

def match_pairs(runs):
    """Group runs by (size, seed) into pairs; check that each pair saw the same tokens."""
    groups = {}
    for run in runs:
        label = f"{run['size']}/seed {run['seed']}"
        pair = groups.setdefault(label, {"label": label})
        if run["model"] in pair:
            old = pair[run["model"]]
            warn(f"{label} has two {run['model']} runs; {run['name']} replaces {old['name']}.")
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


def final_buckets(run):
    """(bucket losses, bucket token counts, their weighted mean) at the last eval that has them."""
    for record in reversed(run["evals"]):
        losses, counts = record.get("val_bucket_loss"), record.get("val_bucket_tokens")
        if losses and counts and len(losses) == len(counts):
            overall = combine_buckets(losses, counts)
            if overall is not None and abs(overall - record["val_loss"]) > 0.01 * record["val_loss"]:
                warn(f"run {run['name']}'s bucket losses average to {overall:.3f}, "
                     f"not its val_loss {record['val_loss']:.3f}.")
            return losses, counts, overall
    return None


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


def plot_loss_curves(pairs, path):
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(14, 5.5))
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
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if any(pair["matched"] is False for pair in pairs):
        fig.suptitle("Pairs marked NOT matched saw different training tokens", color="red")
    return save(fig, path)


def plot_scaling(runs, laws, path):
    points = [r for r in runs if r["n_params"] and r["evals"]]
    if not points:
        return warn("no run has both a parameter count and a validation loss, so scaling was not drawn.")
    fig, (ax, ax_mult) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
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
           title="Scaling: L(N) = A N^-alpha + b (dotted: Leviathan -> dense size with equal loss)")
    draw_multipliers(ax_mult, points)
    for a, corner in ((ax, "upper right"), (ax_mult, "lower right")):
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc=corner)
    return save(fig, path)


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
           title="Leviathan behaves as a dense model N_eff / N times larger")


def plot_data_scaling(pairs, path):
    runs = [pair[m] for pair in pairs for m in ("leviathan", "dense") if m in pair and pair[m]["evals"]]
    if not runs:
        return warn("no run has validation points, so data_scaling was not drawn.")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run in runs:
        style, marker = ("-", "*") if run["model"] == "leviathan" else ("--", "o")
        tokens, val = series(run["evals"], "val_loss")
        label = f"{run['name']} ({run['model']})"
        if "data_law" in run:
            grid = np.geomspace(tokens.min(), tokens.max(), 100)
            ax.plot(grid, power_law(grid, *run["data_law"]), style, color=run["colour"], lw=1)
            label += f": beta = {run['data_law'][1]:.3f}"
        ax.scatter(tokens, val, marker=marker, color=run["colour"], s=25, label=label)
    ax.set(xscale="log", xlabel="tokens seen D", ylabel="validation loss (nats/token)",
           title="Data scaling: L(D) = B D^-beta + b fitted to each run (Leviathan solid, dense dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def bucket_bars(buckets):
    """Bar heights: each bucket's loss (nan when empty), then the token-weighted mean."""
    losses, _, overall = buckets
    return np.array([np.nan if loss is None else loss for loss in losses] + [overall], float)


def plot_rare_tokens(pairs, path):
    rows = []  # (pair, dense bars, Leviathan bars)
    for pair in filter(is_pair, pairs):
        dense, leviathan = final_buckets(pair["dense"]), final_buckets(pair["leviathan"])
        if dense and leviathan and len(dense[0]) == len(leviathan[0]):
            rows.append((pair, bucket_bars(dense), bucket_bars(leviathan)))
    rows = [row for row in rows if len(row[1]) == len(rows[0][1])]
    if not rows:
        return warn("no dense/Leviathan pair has per-bucket validation losses, so rare_tokens was not drawn.")
    n_buckets = len(rows[0][1]) - 1
    names = (BUCKET_NAMES if n_buckets == 5 else [str(i) for i in range(n_buckets)]) + ["all\n(weighted)"]
    x, width = np.arange(n_buckets + 1) - 0.4, 0.8 / (2 * len(rows))
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, (pair, dense, leviathan) in enumerate(rows):
        colour, left = pair["colour"], x + 2 * i * width
        ax.bar(left, dense, width, align="edge", color=colour, alpha=0.4, hatch="//")
        ax.bar(left + width, leviathan, width, align="edge", color=colour, label=pair_name(pair))
        ax_gap.bar(left, dense - leviathan, 2 * width, align="edge", color=colour, label=pair_name(pair),
                   hatch="//" if pair["matched"] is False else None)
    ax_gap.axhline(0, color="black", lw=0.8)
    ax.set_ylim(0, 1.3 * np.nanmax([row[1:] for row in rows]))
    ax.set(ylabel="validation loss (nats/token)",
           title="Loss by token-frequency bucket (pale hatched: dense, solid: Leviathan)")
    ax_gap.set(ylabel="dense minus Leviathan (nats/token)",
               title="Leviathan's advantage by bucket (above 0: better)")
    for a in (ax, ax_gap):
        a.set_xticks(x + 0.4, names)
        a.set_xlabel("token-frequency bucket (by frequency rank in the training stream)")
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=8, ncol=2, loc="upper left")
    return save(fig, path)


def save(fig, path):
    fig.tight_layout()
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


def summary_markdown(runs, laws):
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
                     else f"- {model} law: not fitted (see notes)")
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
    lines.append("- paper reference: Leviathan 109M ~ 230M dense (2.11x), 421M ~ 725M dense (1.72x); "
                 "multipliers 1.47-2.11x")
    lines += [f"- note: {message}" for message in WARNINGS]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, or folders that contain run folders")
    parser.add_argument("--out", help="output folder (default: 'plots' next to the first run)")
    parser.add_argument("--format", choices=["png", "pdf", "svg"], default="png", help="figure format")
    parser.add_argument("--b", type=float, default=PAPER_B, help="the fits' fixed loss floor (default 1.69)")
    parser.add_argument("--free-b", action="store_true", help="fit b too instead of fixing it")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    WARNINGS.clear()
    runs = load_runs(args.runs)
    if not runs:
        print(f"error: found no readable run folder (config.json + log.jsonl) in {' '.join(args.runs)}.",
              file=sys.stderr)
        return 1
    b = None if args.free_b else args.b
    pairs = match_pairs(runs)
    laws = {model: fit_scaling(runs, model, b) for model in ("dense", "leviathan")}
    add_effective_sizes(runs, laws["dense"])
    add_data_fits(runs, b)
    out = Path(args.out) if args.out else runs[0]["dir"].parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_loss_curves(pairs, out / f"loss_curves.{args.format}"),
               plot_scaling(runs, laws, out / f"scaling.{args.format}"),
               plot_data_scaling(pairs, out / f"data_scaling.{args.format}"),
               plot_rare_tokens(pairs, out / f"rare_tokens.{args.format}")]
    table = summary_markdown(runs, laws)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    for path in filter(None, written):
        print(f"wrote {path}")
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
