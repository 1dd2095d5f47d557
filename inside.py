"""Inside the generator: what a trained run's input embeddings look like, next to its fresh init.

Usage:
    python inside.py RUN_DIR... [--out DIR] [--ids 20000] [--queries 2000] [--k 10]

A RUN_DIR holds params.npz and config.json as written by train.py (Leviathan or dense). The fresh
init is rebuilt as train.py makes it (the run's seed, lv.init_params under jax.jit), and the ids the
run saw are replayed from its data stream (config.json: data, tokenizer, seed, batch shape). Figures
and inside.md go to --out (default: runs/inside):

    knots       Leviathan: the histogram of u (the spline inputs) per head over the ids the run saw,
                and the basis mass each knot receives, trained against init
    modes       Leviathan: each head's mode magnitudes, largest first, and their effective rank
    neighbours  the fraction of an id's k nearest neighbours (cosine) that share a base-b digit with
                it, against chance and against the digits of a random relabelling (a control)
    unseen      how far ids the run never saw moved from their initial embedding
    scale       the input embeddings' RMS and the residual stream's after each block, on validation
                tokens, over training (from the params-stepN.npz files a run folder holds, if any)

Exit status 0, 1 for a run folder that cannot be read, 2 for a bad command line; every error is one
sentence. Needs numpy, jax and matplotlib, and the run's data and tokenizer (TIKTOKEN_CACHE_DIR).
"""
import functools
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from machinery import cli  # noqa: E402 -- no JAX in it: quick to load

if __name__ == "__main__":  # a Ctrl-C, even while JAX loads, ends in one sentence
    cli.end_on_ctrl_c("interrupted before inside.py finished; rerun it for its figures and inside.md")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import data  # noqa: E402
import leviathan as lv  # noqa: E402

CHUNK = 2048  # ids per generator call: bounds the (d_seed, ids, rank) intermediates
CONTROL_SEED = 12_345  # the random relabelling whose digits are the neighbours' control


# ---------------------------------------------------------------- reading a run

def read_run(run_dir):
    """{"name", "dir", "config", "params", "cfg", "step"} of a run folder, or cli.UserError."""
    run_dir = Path(run_dir)
    if not (run_dir / "params.npz").is_file() or not (run_dir / "config.json").is_file():
        raise cli.UserError(f"{run_dir} holds no params.npz and config.json (a finished train.py run); train "
                            f"it first, for example with bash results/lab/commands.sh f")
    try:
        params, cfg, meta = lv.load_params(str(run_dir / "params.npz"))
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise cli.UserError(f"{run_dir}/params.npz or config.json cannot be read ({type(e).__name__}); "
                            f"train the run again") from None
    return {"name": run_dir.name, "dir": run_dir, "config": config, "params": params, "cfg": cfg,
            "step": int(meta.get("step", 0))}


def fresh_init(cfg, seed):
    """The run's parameters at step 0, as train.py makes them (lv.init_state: init_params under jit)."""
    return jax.jit(functools.partial(lv.init_params, cfg=cfg))(jax.random.key(seed))


def snapshots(run, init):
    """{step: params} of the run: init, every params-stepN.npz in its folder, and params.npz."""
    found = [(0, init)]
    for path in run["dir"].glob("params-step*.npz"):
        params, _, meta = lv.load_params(str(path))
        found.append((int(meta.get("step", re.sub(r"\D", "", path.stem))), params))
    found.append((run["step"], run["params"]))
    return dict(sorted(found, key=lambda pair: pair[0]))


def seen_ids(config, steps):
    """(ids, counts): the distinct input ids of the run's first `steps` batches, replayed from its data
    stream (the model is not an input of the stream, so a Leviathan run and its dense twin agree)."""
    enc = data.tokenizer(config["tokenizer"])
    cfg = config["config"]
    stream = data.BatchStream(data.resolve_sources(config["data"], "--data"), enc, cfg["seq_len"],
                              cfg["batch_size"], seed=config["seed"], shuffle_buffer=config["shuffle_buffer"])
    tokens = np.concatenate([stream.next_batch()[:, :-1].ravel() for _ in range(steps)])
    return np.unique(tokens, return_counts=True)


def validation_tokens(config, rows=8):
    """The first `rows` sequences of the run's validation data (inputs only): (rows, seq_len)."""
    enc = data.tokenizer(config["tokenizer"])
    sequences = data.token_sequences(data.resolve_sources(config["val_data"], "--val-data"), enc,
                                     config["config"]["seq_len"])
    return np.stack([next(sequences)[:-1] for _ in range(rows)])


def n_real_ids(config):
    """The tokenizer's own ids (the padding above them never occurs in text)."""
    return data.tokenizer(config["tokenizer"]).n_vocab


# ---------------------------------------------------------------- the generator's parts

def head(gen, h):
    """Head h's parameters (the per-head arrays are stacked on a leading axis)."""
    return {name: gen[name][h] for name in ("W", "ln_scale", "ln_bias", "delta", "Wout")}


def knot_mass(u, cfg):
    """(gen_knots,): the basis weight each knot receives, summed over ids and coordinates. Every row of
    the basis sums to 1, so the masses add up to the number of ids times d_seed."""
    return np.asarray(lv.spline_basis(u, cfg.gen_knots).sum(axis=(0, 1)))


def effective_number(weights):
    """exp(entropy) of the weights' shares: 1 when one holds everything, len(weights) when all are equal."""
    p = np.asarray(weights, float)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def used_knots(mass):
    """The effective number of knots: exp(entropy) of the knots' shares of the basis mass."""
    return effective_number(mass)


def mode_magnitudes(head_params, z, cfg):
    """(rank,): each mode's size in the embeddings, RMS over ids of m_r times |Wout_r|."""
    phi = lv.head_factors(head_params, z, cfg)
    modes = lv.separable_product(phi) if cfg.gen_combine == "product" else phi.mean(0)  # as generator_head
    return np.asarray(jnp.sqrt((modes ** 2).mean(0)) * jnp.linalg.norm(head_params["Wout"], axis=1))


def effective_rank(magnitudes):
    """exp(entropy) of the modes' shares of the squared magnitude: 1 (one mode) to rank (all equal)."""
    return effective_number(np.asarray(magnitudes, float) ** 2)


embed = jax.jit(lv.embed, static_argnames="cfg")  # one compiled program per config and chunk shape


def embeddings(params, ids, cfg):
    """Input embeddings of ids (N,) -> (N, d_model) as numpy, the generator called in chunks."""
    return np.concatenate([np.asarray(embed(params, jnp.asarray(ids[i:i + CHUNK]), cfg=cfg))
                           for i in range(0, len(ids), CHUNK)])


# ---------------------------------------------------------------- neighbours, drift, scale

def code_digits(ids, cfg, relabel_seed=0):
    """(N, n_digits): the base-b digits the generator reads for ids (after the run's own
    id_permutation), or, with relabel_seed, those of a random relabelling instead (a control)."""
    seed = relabel_seed or cfg.id_permutation_seed
    ids = lv.id_permutation(seed, cfg.vocab_size)[ids] if seed else np.asarray(ids)
    return np.asarray(lv.decompose(jnp.asarray(ids), cfg.base, cfg.n_digits))


def shares_digit(digits_a, digits_b):
    """(A, B) bool: the two ids have the same digit in at least one position."""
    return (digits_a[:, None, :] == digits_b[None, :, :]).any(-1)


def nearest(emb, queries, k):
    """(Q, k) indices into emb of each query row's k nearest other rows by cosine."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-30)
    cosine = unit[queries] @ unit.T
    cosine[np.arange(len(queries)), queries] = -np.inf  # not itself
    return np.argpartition(-cosine, k, axis=1)[:, :k]


def neighbour_sharing(emb, ids, digits, queries, k):
    """(fraction of the queries' k nearest neighbours sharing a digit with them, chance: the same
    fraction over every candidate)."""
    near = nearest(emb, queries, k)
    shared = np.mean([shares_digit(digits[[q]], digits[row])[0].mean() for q, row in zip(queries, near)])
    return float(shared), float(shares_digit(digits[queries], digits).mean())


def relative_drift(trained, initial):
    """(N,): |e_trained - e_init| / |e_init| per id."""
    return np.linalg.norm(trained - initial, axis=1) / np.linalg.norm(initial, axis=1)


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def stream_scale(params, cfg, tokens):
    """{"embedding", "block 1", ...}: the RMS of the input embeddings on `tokens` and of the residual
    stream after each block, and {"adds 1", ...}: the RMS of what each block adds (lv.block)."""
    x = lv.embed(params, jnp.asarray(tokens), cfg)
    if cfg.embed_norm == "rms":
        x = lv.rms_norm(x, params["embed_norm"], cfg.norm_eps)
    cos, sin = lv.rope_tables(x.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_theta)
    out = {"embedding": rms(x)}
    for i in range(cfg.n_layers):
        layer = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
        after = lv.block(x, layer, cos, sin, cfg)
        out[f"adds {i + 1}"], out[f"block {i + 1}"], x = rms(after - x), rms(after), after
    return out


# ---------------------------------------------------------------- one run's measures

def measure(run, n_ids, n_queries, k):
    """Every number of the figures for one run, as a dict."""
    cfg, config, rng = run["cfg"], run["config"], np.random.default_rng(0)
    init = fresh_init(cfg, config["seed"])
    seen, counts = seen_ids(config, run["step"])
    unseen = np.setdiff1d(np.arange(n_real_ids(config)), seen)
    never = np.sort(rng.choice(unseen, min(n_ids, len(unseen)), replace=False))
    m = {"name": run["name"], "model": cfg.model, "seed": config["seed"], "step": run["step"],
         "set": config.get("set", {}), "n_seen": len(seen), "cfg": cfg}
    queries = np.sort(rng.choice(len(seen), min(n_queries, len(seen)), replace=False))
    digits, control = code_digits(seen, cfg), code_digits(seen, cfg, CONTROL_SEED)
    for when, params in (("init", init), ("trained", run["params"])):
        emb = embeddings(params, seen, cfg)
        m[f"neighbours {when}"], m["chance"] = neighbour_sharing(emb, seen, digits, queries, k)
        m[f"control {when}"], m["control chance"] = neighbour_sharing(emb, seen, control, queries, k)
    m["drift"] = relative_drift(embeddings(run["params"], never, cfg), embeddings(init, never, cfg))
    snaps, tokens = snapshots(run, init), validation_tokens(config)
    m["rms random ids"] = {s: rms(embeddings(p, never, cfg)) for s, p in snaps.items()}
    m["scale"] = {s: stream_scale(p, cfg, tokens) for s, p in snaps.items()}
    if cfg.model == "leviathan":
        for when, params in (("init", init), ("trained", run["params"])):
            gen = params["generator"]
            z = lv.seeds(gen, jnp.asarray(seen), cfg)
            heads = [head(gen, h) for h in range(cfg.gen_heads)]
            us = [lv.head_coordinates(hp, z, cfg) for hp in heads]  # where the basis is evaluated
            m[f"u {when}"] = [np.asarray(u).ravel() for u in us]
            m[f"knot mass {when}"] = [knot_mass(u, cfg) for u in us]
            m[f"modes {when}"] = [mode_magnitudes(hp, z, cfg) for hp in heads]
    return m


# ---------------------------------------------------------------- figures and table

def label(m):
    extra = " ".join(f"{key}={value}" for key, value in sorted(m["set"].items()))
    return " ".join(filter(None, [m["model"], extra, f"s{m['seed']}"]))


def knots_figure(runs):
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 3 * len(runs)), layout="constrained", squeeze=False)
    for (ax_u, ax_k), m in zip(axes, runs):
        G = m["cfg"].gen_knots
        for h, (u, u0) in enumerate(zip(m["u trained"], m["u init"])):
            ax_u.hist(u, bins=100, range=(0, 1), histtype="step", density=True, color=plt.cm.tab10(h))
            ax_k.plot(range(G), m["knot mass trained"][h] / m["knot mass trained"][h].sum(), ".-",
                      color=plt.cm.tab10(h), label=f"head {h}")
        ax_u.hist(np.concatenate(m["u init"]), bins=100, range=(0, 1), histtype="step", density=True,
                  color="black", ls="--", label="init, all heads")
        ax_k.plot(range(G), sum(m["knot mass init"]) / sum(m["knot mass init"]).sum(), "k--", label="init")
        ax_u.set(title=f"{label(m)}: u over the {m['n_seen']:,} ids it saw (colour: head)", xlabel="u",
                 ylabel="density", yscale="log")
        used = [used_knots(x) for x in m["knot mass trained"]]
        ax_k.set(title=f"basis mass per knot (effective knots per head: {min(used):.1f}-{max(used):.1f} of {G})",
                 xlabel="knot", ylabel="share of the mass", yscale="log")
        ax_u.legend(fontsize=7)
    return fig


def modes_figure(runs):
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), layout="constrained", squeeze=False)
    for ax, m in zip(axes[0], runs):
        for h, (mags, mags0) in enumerate(zip(m["modes trained"], m["modes init"])):
            ax.plot(np.sort(mags)[::-1], color=plt.cm.tab10(h))
            ax.plot(np.sort(mags0)[::-1], color=plt.cm.tab10(h), ls=":", alpha=0.5)
        ranks = [effective_rank(x) for x in m["modes trained"]]
        ranks0 = [effective_rank(x) for x in m["modes init"]]
        ax.set(yscale="log", xlabel="mode (largest first)", ylabel="RMS(m_r) |Wout_r|",
               title=f"{label(m)}: effective rank per head\n{min(ranks):.1f}-{max(ranks):.1f} "
                     f"(init, dotted: {min(ranks0):.1f}-{max(ranks0):.1f})")
    return fig


def neighbours_figure(runs):
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(runs)), 4.5), layout="constrained")
    x = np.arange(len(runs))
    for i, (key, name) in enumerate((("neighbours init", "init, its code's digits"),
                                     ("neighbours trained", "trained, its code's digits"),
                                     ("control trained", "trained, a random relabelling's digits"))):
        ax.bar(x + (i - 1) * 0.27, [m[key] for m in runs], 0.27, label=name)
    ax.scatter(x - 0.135, [m["chance"] for m in runs], color="black", marker="_", s=900, zorder=3,
               label="chance, its code's digits")
    ax.scatter(x + 0.27, [m["control chance"] for m in runs], color="grey", marker="_", s=400, zorder=3,
               label="chance, the relabelling's digits")
    ax.set_xticks(x, [label(m) for m in runs], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="neighbours sharing a digit", title="Nearest neighbours (cosine) that share a base-b digit")
    ax.legend(fontsize=8)
    return fig


def unseen_figure(runs):
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for m in runs:
        ax.hist(m["drift"], bins=np.logspace(-4, 2, 121), histtype="step", label=f"{label(m)} "
                f"(median {np.median(m['drift']):.3g})")
    ax.set(xscale="log", xlabel="|e_trained - e_init| / |e_init|", ylabel="ids",
           title=f"Ids the run never saw: how far their embeddings moved ({len(runs[0]['drift']):,} per run)")
    ax.legend(fontsize=8)
    return fig


def scale_figure(runs):
    fig, (ax_e, ax_b) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    for i, m in enumerate(runs):
        steps = sorted(m["scale"])
        colour = plt.cm.tab10(i)
        ax_e.plot(steps, [m["rms random ids"][s] for s in steps], "o-", color=colour, label=label(m))
        ax_b.plot(steps, [m["scale"][s]["embedding"] for s in steps], "o-", color=colour, label=label(m))
        for j in range(1, m["cfg"].n_layers + 1):
            ax_b.plot(steps, [m["scale"][s][f"adds {j}"] for s in steps], ls=["--", ":"][j % 2], color=colour)
    ax_e.set(yscale="log", xlabel="step", ylabel="RMS",
             title=f"Input embeddings' RMS over {len(runs[0]['drift']):,} ids it never saw")
    ax_b.set(yscale="log", xlabel="step", ylabel="RMS on validation tokens",
             title="Embeddings (solid); what block 1 (dotted), 2 (dashed) adds")
    ax_e.legend(fontsize=8)
    return fig


def summary(runs):
    """inside.md: one row per run, every number of the figures."""
    head_ = ["run", "model", "ids seen", "neighbours sharing a digit: init, trained (chance; control)",
             "effective knots per head", "effective rank per head: init, trained", "never-seen drift (median)",
             "embedding RMS, random ids, by step", "on validation tokens: embedding, adds per block, by step"]
    lines = ["| " + " | ".join(head_) + " |", "|" + "---|" * len(head_)]
    for m in runs:
        levi = m["model"] == "leviathan"
        knots = [used_knots(x) for x in m["knot mass trained"]] if levi else []
        ranks = ([effective_rank(x) for x in m["modes init"]], [effective_rank(x) for x in m["modes trained"]]) \
            if levi else None
        scale = "; ".join(f"{s}: {v['embedding']:.3g}, " + ", ".join(
            f"{v[f'adds {j}']:.3g}" for j in range(1, m["cfg"].n_layers + 1)) for s, v in sorted(m["scale"].items()))
        cells = [m["name"], label(m), f"{m['n_seen']:,}",
                 f"{m['neighbours init']:.3f}, {m['neighbours trained']:.3f} ({m['chance']:.3f}; "
                 f"{m['control trained']:.3f})",
                 f"{min(knots):.1f}-{max(knots):.1f} of {m['cfg'].gen_knots}" if levi else "-",
                 (f"{np.mean(ranks[0]):.1f} ({min(ranks[0]):.1f}-{max(ranks[0]):.1f}), "
                  f"{np.mean(ranks[1]):.1f} ({min(ranks[1]):.1f}-{max(ranks[1]):.1f})") if levi else "-",
                 f"{np.median(m['drift']):.3g}",
                 "; ".join(f"{s}: {v:.3g}" for s, v in sorted(m["rms random ids"].items())), scale]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def parse_args(argv):
    parser = cli.OneLineParser(prog="inside.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders holding params.npz and config.json")
    parser.add_argument("--out", default="runs/inside", help="output folder (default runs/inside)")
    parser.add_argument("--ids", type=cli.number(1), default=20_000, help="never-seen ids to sample (20000)")
    parser.add_argument("--queries", type=cli.number(1), default=2_000, help="ids whose neighbours are counted")
    parser.add_argument("--k", type=cli.number(1), default=10, help="nearest neighbours per id (10)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.use_compile_cache()
    try:
        runs = [measure(read_run(path), args.ids, args.queries, args.k) for path in args.runs]
    except cli.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levi = [m for m in runs if m["model"] == "leviathan"]
    figures = {"neighbours": neighbours_figure, "unseen": unseen_figure, "scale": scale_figure}
    if levi:
        figures = {"knots": knots_figure, "modes": modes_figure, **figures}
    for name, draw in figures.items():
        fig = draw(levi if name in ("knots", "modes") else runs)
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        print(f"wrote {out / name}.png")
    table = summary(runs)
    (out / "inside.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
