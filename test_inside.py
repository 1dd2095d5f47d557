"""inside.py on a tiny, freshly saved run folder: its measures are the generator's own, and its
command line fails in one sentence (exit 1: a bad folder; exit 2: bad numbers)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inside
import leviathan as lv
from conftest import small_config as small

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as train.py leaves it after 3 steps: config.json and params.npz (bytes tokenizer)."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "train.txt").write_text(TEXT)
    cfg = small()
    params = inside.fresh_init(cfg, 0)
    params = jax.tree_util.tree_map(lambda a: a * 1.01, params)  # "trained": not the init
    lv.save_params(str(folder / "params.npz"), params, cfg, step=3, tokenizer="bytes")
    config = {"model": "leviathan", "size": "tiny", "seed": 0, "tokenizer": "bytes", "shuffle_buffer": 0,
              "data": [str(folder / "train.txt")], "val_data": [str(folder / "train.txt")],
              "config": dataclasses.asdict(cfg), "set": {"d_seed": 32}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_head_coordinates_and_knot_mass():
    cfg = small()
    gen = inside.fresh_init(cfg, 0)["generator"]
    z = lv.seeds(gen, jnp.arange(100), cfg)
    for h in range(cfg.gen_heads):
        hp = inside.head(gen, h)
        u = lv.head_coordinates(hp, z, cfg)
        assert u.shape == (cfg.d_seed, 100) and float(u.min()) > 0 and float(u.max()) < 1
        np.testing.assert_allclose(lv.spline_basis(u, cfg.gen_knots) @ (1.0 + hp["delta"]),
                                   lv.head_factors(hp, z, cfg), rtol=1e-6)
        mass = inside.knot_mass(u, cfg)
        assert mass.shape == (cfg.gen_knots,) and mass.sum() == pytest.approx(100 * cfg.d_seed, rel=1e-5)
        assert 1 <= inside.used_knots(mass) <= cfg.gen_knots
        assert inside.used_knots(np.ones(8)) == pytest.approx(8)


def test_fresh_init_is_train_pys():
    cfg = small()
    state = lv.init_state(jax.random.key(3), cfg)
    same = jax.tree_util.tree_map(np.array_equal, state["params"], inside.fresh_init(cfg, 3))
    assert all(jax.tree_util.tree_leaves(same))


def test_effective_rank_lies_between_one_and_the_rank():
    assert inside.effective_rank(np.ones(16)) == pytest.approx(16)
    assert inside.effective_rank(np.eye(16)[0]) == pytest.approx(1)
    cfg = small()
    gen = inside.fresh_init(cfg, 0)["generator"]
    mags = inside.mode_magnitudes(inside.head(gen, 0), lv.seeds(gen, jnp.arange(200), cfg), cfg)
    assert mags.shape == (cfg.gen_rank,) and 1 <= inside.effective_rank(mags) <= cfg.gen_rank


def test_a_random_relabelling_shares_digits_at_chance_and_the_init_above_it():
    cfg = small("leviathan", vocab_size=4096)  # base 16: chance of a shared digit about 18%
    ids = np.arange(cfg.vocab_size)
    queries = np.random.default_rng(0).choice(len(ids), 400, replace=False)
    emb = inside.embeddings(inside.fresh_init(cfg, 0), ids, cfg)
    control, chance = inside.neighbour_sharing(emb, ids, inside.code_digits(ids, cfg, 7), queries, 10)
    assert control == pytest.approx(chance, abs=0.04) and 0.1 < chance < 0.3
    own, _ = inside.neighbour_sharing(emb, ids, inside.code_digits(ids, cfg), queries, 10)
    assert own > chance + 0.2  # at init an embedding is a function of its digits
    dense = inside.embeddings(inside.fresh_init(small("dense", vocab_size=4096), 0), ids, small("dense", vocab_size=4096))
    table, _ = inside.neighbour_sharing(dense, ids, inside.code_digits(ids, cfg), queries, 10)
    assert table == pytest.approx(chance, abs=0.04)  # a random table knows no digits


def test_relative_drift_and_stream_scale():
    e0 = np.ones((5, 4))
    np.testing.assert_allclose(inside.relative_drift(2 * e0, e0), 1.0)
    cfg = small("dense")
    params = inside.fresh_init(cfg, 0)
    scale = inside.stream_scale(params, cfg, np.arange(32).reshape(2, 16))
    assert set(scale) == {"embedding", "adds 1", "block 1", "adds 2", "block 2"}
    assert scale["embedding"] == pytest.approx(0.02, rel=0.2)


def test_main_on_a_saved_run(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert inside.main([str(run_dir), "--out", str(out), "--ids", "50", "--queries", "20", "--k", "3"]) == 0
    for name in ("knots", "modes", "neighbours", "unseen", "scale"):
        assert (out / f"{name}.png").stat().st_size > 1000
    table = (out / "inside.md").read_text()
    assert "leviathan d_seed=32 s0" in table and table in capsys.readouterr().out
    m = inside.measure(inside.read_run(run_dir), 50, 20, 3)
    seen = set(np.unique(np.frombuffer(TEXT.encode(), np.uint8)).tolist())
    assert m["n_seen"] <= len(seen) and set(m["scale"]) == {0, 3}
    for mass in m["knot mass trained"]:
        assert mass.sum() == pytest.approx(m["n_seen"] * 32, rel=1e-5)


@pytest.mark.parametrize("argv, code, words", [
    (["nowhere"], 1, "nowhere holds no params.npz and config.json"),
    (["RUN", "--ids", "0"], 2, "argument --ids: must be a whole number of 1 or more (like 2000000, 2e6 or 2M), not '0'"),
    (["RUN", "--k", "x"], 2, "argument --k: must be a whole number of 1 or more (like 2000000, 2e6 or 2M), not 'x'"),
    ([], 2, "the following arguments are required: runs")])
def test_errors_are_one_sentence(argv, code, words, run_dir, tmp_path, capsys):
    argv = [str(run_dir) if a == "RUN" else str(tmp_path / a) if a == "nowhere" else a for a in argv]
    try:
        status = inside.main(argv + ["--out", str(tmp_path / "o")])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == code and err.count("\n") == 1 and words in err, err
