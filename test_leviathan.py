"""Tests of the whole project, CPU and offline: leviathan.py (model, generator, optimizer, train
step), train.py (streamed data, HTTP reconnection, evaluation, checkpoints, resume, errors) and plot.py
(fits and figures). The only network is a server on 127.0.0.1 that a test starts.

Run: python -m pytest -q
"""

import functools
import http.server
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# Two CPU devices for the data-parallel test; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
HERE = os.path.dirname(os.path.abspath(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zstandard  # noqa: E402

import data  # noqa: E402
import leviathan as lv  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402


@functools.cache
def encoding_problem(name):
    """None where tiktoken can load the encoding `name` (from its cache, or by downloading it), else why not."""
    import tiktoken

    try:
        tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 -- any failure means the same: no tokenizer file here
        return (f"needs tiktoken's {name}, which is neither in its cache nor downloadable here "
                f"({type(e).__name__}); set TIKTOKEN_CACHE_DIR to a folder holding it")
    return None


def skip_without(*names):
    """Skip the calling test, with its one-line reason, where a tokenizer file it needs cannot be had."""
    for name in names:
        if problem := encoding_problem(name):
            pytest.skip(problem)


@pytest.fixture
def o200k():
    """For tests that tokenize with o200k_base (train.py's default tokenizer)."""
    skip_without("o200k_base")

# ================================================================================================
# leviathan.py
# ================================================================================================

V_SMALL = 512  # a small vocabulary keeps most tests fast
# A small generator too (2 heads of rank 16 over 32 seed coordinates, 8 knots), for the tests of the
# train step's mechanics; the generator's own tests use the paper's full size.
SMALL_GENERATOR = dict(d_seed=32, gen_heads=2, gen_rank=16, gen_knots=8)


def small_config(model="leviathan", **overrides):
    fields = dict(vocab_size=V_SMALL, seq_len=16, batch_size=4, steps=100, dtype="float32", **SMALL_GENERATOR)
    return lv.config("tiny", model, **{**fields, **overrides})


def random_tokens(seed, batch, seq_len, vocab):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    """Leaf by leaf; atol is relative to the leaf's largest entry (float32 sums differ in order)."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * max(1.0, np.abs(y).max()))


# --- 2. decomposition --------------------------------------------------------------------------


@pytest.mark.parametrize("vocab, k, base", [
    (200_376, 3, 59),  # o200k padded: 59^3 = 205,379
    (100_277, 3, 47),  # cl100k: 47^3 = 103,823 >= 100,277 > 46^3 = 97,336
    (256, 3, 7),  # bytes: 7^3 = 343 >= 256 > 6^3 = 216
    (257, 3, 7),  # bytes + <|endoftext|>
    (343, 3, 7), (344, 3, 8),  # exact cube and one past it
    (1_000_000, 3, 100), (1_000_001, 3, 101),  # where a float cube root is off by one
    (200_376, 2, 448), (200_376, 1, 200_376),
])
def test_digit_base_is_smallest_b_with_b_pow_k_at_least_vocab(vocab, k, base):
    assert lv.digit_base(vocab, k) == base
    assert base**k >= vocab and (base - 1) ** k < vocab


def test_paper_decomposition_has_177_codebook_rows():
    cfg = lv.config("60M")
    assert (cfg.vocab_size, cfg.base, cfg.n_digits * cfg.base) == (200_376, 59, 177)


def test_decompose_is_a_bijection_over_the_whole_vocabulary():
    ids = np.arange(200_376)
    digits = np.asarray(lv.decompose(ids, 59, 3))  # (V, 3)
    assert digits.shape == (200_376, 3) and digits.min() == 0 and digits.max() == 58
    np.testing.assert_array_equal(digits[:, 0] * 59**2 + digits[:, 1] * 59 + digits[:, 2], ids)
    assert len(np.unique(digits, axis=0)) == 200_376
    np.testing.assert_array_equal(np.asarray(lv.decompose(np.array([[60]]), 59, 3)), [[[0, 1, 1]]])


def test_tokenizer_vocabularies():
    import tiktoken

    skip_without("o200k_base", "cl100k_base")
    assert lv.padded_vocab(tiktoken.get_encoding("o200k_base")) == 200_376
    assert lv.padded_vocab(tiktoken.get_encoding("cl100k_base")) == 100_277
    enc = lv.byte_encoding()
    assert lv.padded_vocab(enc) == 257 and lv.digit_base(257, 3) == 7
    text = "Leviathan\n  tokens: naïve ✓\n"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert len(enc.encode_ordinary(text)) == len(text.encode())


# --- 3. generator -------------------------------------------------------------------------------


def test_spline_basis_is_the_normalised_quadratic_b_spline():
    G = 32
    u = jnp.linspace(0, 1, 1001)
    B = np.asarray(lv.spline_basis(u, G))  # (1001, G)
    assert B.shape == (1001, G) and (B >= 0).all()
    np.testing.assert_allclose(B.sum(-1), 1.0, atol=1e-6)
    assert ((B > 1e-9).sum(-1) <= 3).all()  # local support: at most 3 basis functions
    # an interior point: the cardinal quadratic B-spline, which already sums to 1 there
    t = np.abs(0.5 - np.arange(G) / (G - 1)) * (G - 1)
    ref = np.where(t < 0.5, 0.75 - t**2, np.where(t < 1.5, 0.5 * (1.5 - t) ** 2, 0))
    np.testing.assert_allclose(np.asarray(lv.spline_basis(jnp.array(0.5), G)), ref, atol=1e-6)


def test_separable_product_is_stable_for_128_factors():
    phi = jnp.concatenate([jnp.full((64, 2), 1e3), jnp.full((64, 2), 1e-3)])  # (d=128, modes=2)
    phi = phi.at[0, 1].multiply(-1.0)  # an odd number of negatives in mode 1
    with np.errstate(over="ignore"):
        naive = np.cumprod(np.asarray(phi, np.float32), axis=0)[-1]
    assert not np.isfinite(naive).all()  # the plain product overflows on its way
    np.testing.assert_allclose(np.asarray(lv.separable_product(phi)), [1.0, -1.0], rtol=1e-3)
    tiny = lv.separable_product(jnp.full((128, 1), 0.25))  # 0.25^128 ~ 1e-77: underflows to 0
    grad = jax.grad(lambda p: lv.separable_product(p).sum())(jnp.full((128, 1), 0.5).at[3, 0].set(0.0))
    assert np.isfinite(np.asarray(tiny)).all() and np.isfinite(np.asarray(grad)).all()


F32_MAX, F32_TINY = 3.4e38, 1.2e-38


def basis_with_row_sum(u, n_knots):
    """The spline basis as it was: normalised by its row sum b.sum(-1)."""
    knots = jnp.linspace(0.0, 1.0, n_knots)
    t = jnp.abs(u[..., None] - knots) * (n_knots - 1)
    b = jnp.where(t < 0.5, 0.75 - t**2, jnp.where(t < 1.5, 0.5 * (1.5 - t) ** 2, 0.0))
    return b / b.sum(-1, keepdims=True)


def exact_product(phi):
    return np.prod(np.asarray(phi, np.float64), axis=0)


def parity_sign(phi):
    return np.where(np.sum(np.asarray(phi) < 0, axis=0) % 2, -1.0, 1.0)


def representable(x):
    return np.isfinite(x) & (np.abs(x) > F32_TINY) & (np.abs(x) < F32_MAX)


def rel_err(a, b):
    return np.abs(np.asarray(a, np.float64) / np.asarray(b, np.float64) - 1.0)


def numpy_init(cfg, delta_std=None, seed=0):
    """Generator parameters like lv.init_generator's (numpy's RNG: much faster to build here)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: lv.init_generator(key, cfg), jax.random.key(0))
    std = {"codebooks": cfg.init_std, "W": cfg.init_std, "delta": delta_std or cfg.spline_init_std,
           "Wout": cfg.init_std / np.sqrt(cfg.gen_heads)}
    gen = {name: std[name] * rng.standard_normal(s.shape) for name, s in shapes.items() if name in std}
    gen["ln_scale"], gen["ln_bias"] = np.ones(shapes["ln_scale"].shape), np.zeros(shapes["ln_bias"].shape)
    return {name: jnp.asarray(x, jnp.float32) for name, x in gen.items()}


@functools.lru_cache(maxsize=None)
def generator(delta_std, size="60M"):
    """(cfg, params, ids); delta_std 0.5 or 1 is trained-like: factors straddle zero, vary widely."""
    cfg = lv.config(size, dtype="float32")
    gen = numpy_init(cfg, delta_std)
    ids = jnp.asarray(np.random.default_rng(0).choice(cfg.vocab_size, 128, replace=False))
    return cfg, gen, ids


@functools.partial(jax.jit, static_argnums=2)
def all_phi(gen, ids, cfg):
    """The factors phi of every head, as in generator_head: (d_seed, U, gen_heads * rank)."""
    z = lv.seeds(gen, ids, cfg)
    heads = [{name: gen[name][h] for name in ("W", "ln_scale", "ln_bias", "delta")} for h in range(cfg.gen_heads)]
    return jnp.concatenate([lv.head_factors(head, z, cfg) for head in heads], -1)




def test_spline_basis_equals_row_sum_normalisation():
    u = jax.random.uniform(jax.random.key(0), (4096,))
    ends = [0.0, 1.0, 1e-7, 1 - 1e-7, 0.2 / 31, 0.5 / 31, 0.7 / 31, 30.3 / 31, 30.5 / 31, 30.9 / 31]
    u = u.at[: len(ends)].set(jnp.array(ends))
    new, old = lv.spline_basis(u, 32), basis_with_row_sum(u, 32)
    np.testing.assert_allclose(new, old, atol=1e-6)
    np.testing.assert_allclose(new.sum(-1), 1.0, atol=1e-6)
    w = jnp.cos(jnp.arange(32.0))
    g_new = jax.jit(jax.grad(lambda u: (lv.spline_basis(u, 32) @ w).sum()))(u)
    g_old = jax.jit(jax.grad(lambda u: (basis_with_row_sum(u, 32) @ w).sum()))(u)
    np.testing.assert_allclose(g_new, g_old, atol=1e-4 * float(jnp.abs(g_old).max()))


# The fast separable product against its definition (and the exact float64 product): (a) modes of the
# real generator, at init and with trained-like parameters.


def test_modes_match_reference_at_init():
    cfg, gen, ids = generator(None)
    phi = all_phi(gen, ids, cfg)
    new, ref, exact = lv.separable_product(phi), lv.separable_product_reference(phi), exact_product(phi)
    assert rel_err(new, ref).max() < 1e-5
    assert rel_err(new, exact).max() < 1e-5
    assert np.array_equal(np.sign(new), parity_sign(phi))


@pytest.mark.parametrize("delta_std", [0.5, 1.0])
def test_modes_match_exact_product_trained_like(delta_std):
    cfg, gen, ids = generator(delta_std)
    phi = all_phi(gen, ids, cfg)
    assert (phi < 0).mean() > 1e-3 and float(jnp.abs(phi).min()) < 1e-5  # straddles zero
    new, ref, exact = map(np.asarray, (lv.separable_product(phi), lv.separable_product_reference(phi),
                                      exact_product(phi)))
    ok = representable(exact)
    assert ok.mean() > 0.999
    assert rel_err(new[ok], exact[ok]).max() < 1e-5  # measured 1.4e-6
    assert rel_err(new[ok], ref[ok]).max() < 1e-4  # the reference's own error: up to 4e-5
    assert np.array_equal(np.sign(new[ok]), parity_sign(phi)[ok])  # sign exact


# (b) factors anywhere in [1e-3, 1e3], negatives and zeros


def wide_range_factors():
    """(128, N) columns whose plain running products over- and underflow float32 on the way."""
    rng = np.random.default_rng(0)
    big_then_small = np.r_[np.full(64, 1e3), np.full(64, 1e-3)]  # partial products reach 1e192
    cols = [big_then_small, big_then_small[::-1], np.tile(np.r_[np.full(8, 1e3), np.full(8, 1e-3)], 8)]
    for _ in range(40):  # log-uniform in [1e-3, 1e3], balanced by reciprocals, shuffled: product ~1
        v = 10.0 ** rng.uniform(-3, 3, 64)
        cols.append(rng.permutation(np.r_[v, 1 / v]))
    for k in (5, 10, 12):  # products 1e15, 1e30, 1e36: large but representable
        cols.append(np.r_[np.full(k, 1e3), rng.uniform(0.9, 1.1, 128 - k)])
        cols.append(1 / cols[-1])
    phi = np.stack(cols, 1)
    phi *= np.where(rng.random(phi.shape) < 0.3, -1.0, 1.0)  # negatives
    phi[:, 1::7] *= -1
    return phi.astype(np.float32)


def test_wide_range_products_finite_and_exact():
    phi = wide_range_factors()
    with np.errstate(over="ignore"):  # the data would catch chunks of 16 factors: they overflow
        assert np.isinf(np.prod(phi[:16, 0])) and np.isfinite(np.prod(phi[:8, 0]))
    exact = exact_product(phi)
    assert representable(exact).all()
    new = np.asarray(lv.separable_product(jnp.asarray(phi)))
    assert np.isfinite(new).all()
    assert rel_err(new, exact).max() < 1e-5
    assert np.array_equal(np.sign(new), parity_sign(phi))
    ref = np.asarray(lv.separable_product_reference(jnp.asarray(phi)))
    assert rel_err(new, ref).max() < 1e-4
    w = np.random.default_rng(1).normal(size=new.shape).astype(np.float32)
    grad = np.asarray(jax.grad(lambda p: (lv.separable_product(p) * w).sum())(jnp.asarray(phi)))
    exact_grad = w * exact / phi.astype(np.float64)  # d prod / d phi_d = prod / phi_d
    assert np.isfinite(grad).all()
    assert rel_err(grad, exact_grad).max() < 1e-5


def test_zero_factors_give_zero_and_finite_gradient():
    phi = wide_range_factors()[:, :12].copy()
    phi[3, 0] = 0.0
    phi[100, 1] = -0.0
    phi[[5, 77], 2] = 0.0
    new = np.asarray(lv.separable_product(jnp.asarray(phi)))
    ref = np.asarray(lv.separable_product_reference(jnp.asarray(phi)))
    assert np.all(new[:3] == 0.0) and np.all(np.abs(ref[:3]) < 1e-20)  # reference: ~1e-30 * the rest
    assert np.all(rel_err(new[3:], exact_product(phi)[3:]) < 1e-5)
    grad = jax.grad(lambda p: lv.separable_product(p).sum())(jnp.asarray(phi))
    ref_grad = jax.grad(lambda p: lv.separable_product_reference(p).sum())(jnp.asarray(phi))
    assert np.isfinite(grad).all() and np.isfinite(ref_grad).all()
    assert grad[3, 0] == 0.0 and ref_grad[3, 0] == 0.0  # the zero factor itself: 0, as with the floor


def test_overflow_is_not_capped():
    phi = np.r_[np.full(20, 1e3), np.ones(108)].astype(np.float32)[:, None] * np.array([1, -1], np.float32)
    phi[:, 1] = np.r_[-1e3, phi[1:, 0]]
    new = np.asarray(lv.separable_product(jnp.asarray(phi)))
    assert np.isposinf(new[0]) and np.isneginf(new[1])  # 1e60: overflows to inf (no cap), sign kept


# (c) gradients against finite differences, in float64


def test_gradients_match_finite_differences_float64():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        phi = jnp.asarray(rng.uniform(0.3, 3.0, (128, 6)) * np.where(rng.random((128, 6)) < 0.2, -1, 1))
        w = jnp.asarray(rng.normal(size=6))
        f = lambda p: (lv.separable_product(p) * w).sum()  # noqa: E731
        v = jnp.asarray(rng.normal(size=phi.shape))
        eps = 1e-6
        fd = (f(phi + eps * v) - f(phi - eps * v)) / (2 * eps)
        ad = jnp.vdot(jax.grad(f)(phi), v)
        assert phi.dtype == jnp.float64 and abs(fd / ad - 1) < 1e-7, (fd, ad)

        cfg = lv.config("tiny", dtype="float32", gen_heads=2)
        shapes = jax.eval_shape(lambda key: lv.init_generator(key, cfg), jax.random.key(0))
        gen = {name: jnp.asarray(0.1 * rng.standard_normal(s.shape)) for name, s in shapes.items()}
        gen["delta"] = 5 * gen["delta"]  # trained-like spline coefficients
        ids = jnp.arange(0, 200_000, 25_013)
        cot = jnp.asarray(rng.normal(size=(len(ids), cfg.d_model)))

        def embed(p):  # lv.generate_embeddings without its float32 scan carry: heads summed in float64
            z = lv.seeds(p, ids, cfg)
            heads = [{k: p[k][h] for k in ("W", "ln_scale", "ln_bias", "delta", "Wout")}
                     for h in range(cfg.gen_heads)]
            return sum(lv.generator_head(head, z, cfg) for head in heads)

        g = jax.jit(lambda p: jnp.vdot(embed(p), cot))
        grad = jax.grad(g)(gen)
        for name in ("codebooks", "W", "ln_scale", "ln_bias", "delta", "Wout"):
            d = jnp.asarray(rng.normal(size=gen[name].shape))
            h = 1e-7 * max(float(jnp.abs(gen[name]).max()), 1.0)  # central differences: error O(h^2)
            up, down = dict(gen), dict(gen)
            up[name], down[name] = gen[name] + h * d, gen[name] - h * d
            fd = (g(up) - g(down)) / (2 * h)
            ad = jnp.vdot(grad[name], d)
            assert abs(fd - ad) <= 1e-6 * abs(ad) + 1e-12, (name, fd, ad)


# (d) whole generator: embeddings and their gradient, new against the reference path


@pytest.mark.parametrize("delta_std", [None, 0.5])
def test_embeddings_match_reference_path(delta_std, monkeypatch):
    cfg, gen, ids = generator(delta_std)
    cot = jax.random.normal(jax.random.key(2), (ids.shape[0], cfg.d_model))

    def table_and_grad(p):
        table, vjp = jax.vjp(lambda p: lv.embed({"generator": p}, ids, cfg), p)
        return table, vjp(cot)[0]

    new_table, new_grad = jax.jit(table_and_grad)(gen)
    monkeypatch.setattr(lv, "separable_product", lv.separable_product_reference)
    monkeypatch.setattr(lv, "spline_basis", basis_with_row_sum)
    ref_table, ref_grad = jax.jit(table_and_grad)(gen)
    row_err = jnp.linalg.norm(new_table - ref_table, axis=-1) / jnp.linalg.norm(ref_table, axis=-1)
    assert float(row_err.max()) < 1e-5
    for name in gen:
        scale = float(jnp.abs(ref_grad[name]).max())
        assert float(jnp.abs(new_grad[name] - ref_grad[name]).max()) < 1e-4 * scale, name


def test_generator_shapes_finite_deterministic_and_distinct():
    cfg = lv.config("tiny")  # the full 200,376 vocabulary, 128 factors per mode
    ids = jnp.array([0, 1, 58, 59, 3481, 100_000, 200_375], jnp.int32)
    params = lv.init_params(jax.random.key(0), cfg)
    e = np.asarray(lv.embed(params, ids, cfg))
    assert e.shape == (7, cfg.d_model) and e.dtype == np.float32 and np.isfinite(e).all()
    again = np.asarray(lv.embed(lv.init_params(jax.random.key(0), cfg), ids, cfg))
    np.testing.assert_array_equal(e, again)
    distances = np.linalg.norm(e[:, None] - e[None], axis=-1) + np.eye(7)
    assert distances.min() > 1e-3 * np.abs(e).mean()
    assert np.asarray(lv.embed(params, ids[None, :], cfg)).shape == (1, 7, cfg.d_model)


def test_generator_is_float32_under_a_bfloat16_body():
    cfg = small_config(dtype="bfloat16")
    params = lv.init_params(jax.random.key(0), cfg)
    assert lv.embed(params, jnp.arange(10), cfg).dtype == jnp.float32
    assert jax.tree_util.tree_all(jax.tree.map(lambda x: x.dtype == jnp.float32, params))
    logits = lv.forward(params, jnp.zeros((1, 8), jnp.int32), cfg)
    assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("model", lv.MODELS)
def test_distinct_id_path_equals_per_position_path(model):
    cfg = small_config(model)
    params = lv.init_params(jax.random.key(1), cfg)
    tokens = random_tokens(0, 4, cfg.seq_len, 40)  # many repeats
    batch = lv.prepare_batch(tokens)
    assert batch["ids"].shape == (64,) and batch["inverse"].shape == (4, cfg.seq_len)

    def per_position(params):
        x = lv.embed(params, jnp.asarray(tokens[:, :-1]), cfg)  # the generator at every position
        return lv.cross_entropy(lv.transformer(params, x, cfg), tokens[:, 1:]).mean()

    loss_a, grads_a = jax.value_and_grad(lv.loss_fn)(params, batch, cfg)
    loss_b, grads_b = jax.value_and_grad(per_position)(params)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    assert_trees_close(grads_a, grads_b, rtol=1e-3, atol=1e-5)
    logits = lv.forward(params, jnp.asarray(tokens[:, :-1]), cfg)
    np.testing.assert_allclose(np.asarray(lv.cross_entropy(logits, tokens[:, 1:]).mean()),
                               float(loss_b), rtol=1e-6)


# --- 4. transformer ------------------------------------------------------------------------------


# The paper's parameter counts (head, norms and generator included), as given in the issue.
PAPER_COUNTS = {
    "tiny": (25_779_520, 15_241_152), "60M": (108_887_296, 59_975_040),
    "109M": (108_887_296, 108_233_088), "230M": (230_357_504, 230_967_936),
    "410M": (611_722_240, 409_314_432), "421M": (421_042_944, 420_819_840),
}


@pytest.mark.parametrize("size", list(PAPER_COUNTS))
def test_parameter_counts_match_the_size_table(size):
    dense, leviathan = PAPER_COUNTS[size]
    assert lv.count_params(lv.param_shapes(lv.config(size, "dense"))) == dense
    shapes = lv.param_shapes(lv.config(size))
    assert lv.count_params(shapes) == leviathan
    if size == "60M":
        assert lv.count_params(shapes["generator"]) == 2_384_000


def test_size_table_is_printed_from_the_code():
    table = lv.size_table()
    assert "| 109M | 256 | 4 | 6 | 52 | 108,887,296 | 108,233,088 | 2,384,000 |" in table


@pytest.mark.parametrize("model", lv.MODELS)
def test_causality(model):
    cfg = small_config(model)
    params = lv.init_params(jax.random.key(2), cfg)
    tokens = jnp.asarray(random_tokens(1, 2, cfg.seq_len, V_SMALL)[:, :-1])
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % V_SMALL)
    a, b = lv.forward(params, tokens, cfg), lv.forward(params, changed, cfg)
    np.testing.assert_allclose(np.asarray(a[:, :9]), np.asarray(b[:, :9]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(a[:, 9:] - b[:, 9:])).max() > 1e-4  # and the future did change


@pytest.mark.parametrize("model", lv.MODELS)
def test_initial_loss_is_close_to_log_vocab(model):
    cfg = lv.config("tiny", model, seq_len=32, dtype="float32")  # full 200,376 vocabulary
    params = lv.init_params(jax.random.key(3), cfg)
    batch = lv.prepare_batch(random_tokens(2, 2, 32, cfg.vocab_size))
    assert abs(float(lv.loss_fn(params, batch, cfg)) - math.log(cfg.vocab_size)) < 0.05


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(np.asarray(lv.rms_norm(x, w, 1e-5)), ref, rtol=1e-5, atol=1e-6)


def test_rope_matches_numpy_and_is_relative():
    T, hd, theta = 12, 8, 10_000.0
    cos, sin = lv.rope_tables(T, hd, theta)
    x = np.random.default_rng(0).normal(size=(1, T, 1, hd)).astype(np.float32)
    out = np.asarray(lv.apply_rope(jnp.asarray(x), cos, sin))
    for m in range(T):  # reference: rotate pairs (j, j + hd/2) by angle m * theta^(-2j/hd)
        for j in range(hd // 2):
            a = m * theta ** (-2 * j / hd)
            x1, x2 = x[0, m, 0, j], x[0, m, 0, j + hd // 2]
            np.testing.assert_allclose(out[0, m, 0, [j, j + hd // 2]],
                                       [x1 * np.cos(a) - x2 * np.sin(a), x1 * np.sin(a) + x2 * np.cos(a)],
                                       rtol=1e-4, atol=1e-5)
    q = np.broadcast_to(x[:, :1], x.shape)  # the same q and k vectors at every position
    k = np.broadcast_to(np.random.default_rng(1).normal(size=(1, 1, 1, hd)).astype(np.float32), x.shape)
    rq, rk = np.asarray(lv.apply_rope(jnp.asarray(q), cos, sin)), np.asarray(lv.apply_rope(jnp.asarray(k), cos, sin))
    dots = np.einsum("mh,nh->mn", rq[0, :, 0], rk[0, :, 0])  # q(m) . k(n)
    for offset in range(-3, 4):
        diagonal = np.diagonal(dots, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-4, atol=1e-5)
    assert np.ptp(np.diagonal(dots, 0)) < 1e-4 < abs(dots[0, 0] - dots[0, 3])


# --- the lab's knobs ------------------------------------------------------------------------------


def generator_formula(cfg):
    """The generator's parameter count by hand: codebooks, then per head W, LayerNorm, S, Wout."""
    ds, G, R, D = cfg.d_seed, cfg.gen_knots, cfg.gen_rank, cfg.d_model
    return cfg.n_digits * cfg.base * ds + cfg.gen_heads * (ds * ds + 2 * ds + ds * G * R + R * D)


@pytest.mark.parametrize("knobs", [dict(n_digits=2), dict(n_digits=4), dict(gen_knots=8, gen_rank=16),
                                   dict(d_seed=16, gen_heads=3), dict(gen_combine="sum"),
                                   dict(id_permutation_seed=7), dict(embed_norm="rms")])
def test_generator_knobs_run_and_count_as_their_formula(knobs):
    cfg = small_config(**knobs)
    shapes = lv.param_shapes(cfg)
    assert lv.count_params(shapes["generator"]) == generator_formula(cfg)
    assert cfg.base ** cfg.n_digits >= cfg.vocab_size > (cfg.base - 1) ** cfg.n_digits
    assert ("embed_norm" in shapes) == (knobs.get("embed_norm") == "rms")
    state = lv.init_state(jax.random.key(0), cfg)
    batch = lv.prepare_batch(random_tokens(0, 4, 16, V_SMALL))
    state, metrics = lv.make_train_step(cfg)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_the_default_knobs_are_the_papers_model():
    cfg = lv.Config()
    assert (cfg.embed_norm, cfg.gen_combine, cfg.id_permutation_seed) == ("none", "product", 0)
    assert cfg.embed_init_std == cfg.init_std
    assert "embed_norm" not in lv.param_shapes(small_config("dense"))


def test_sum_combine_makes_each_mode_the_mean_of_its_factors():
    cfg = small_config(gen_combine="sum")
    gen = lv.init_params(jax.random.key(0), cfg)["generator"]
    ids = jnp.arange(10)
    z = lv.seeds(gen, ids, cfg)
    expected = sum(lv.head_factors({k: v[h] for k, v in gen.items() if k != "codebooks"}, z, cfg).mean(0)
                   @ gen["Wout"][h] for h in range(cfg.gen_heads))
    np.testing.assert_allclose(lv.generate_embeddings(gen, ids, cfg), expected, rtol=1e-5, atol=1e-7)


def test_id_permutation_relabels_the_ids_before_decomposition():
    plain, permuted = small_config(), small_config(id_permutation_seed=3)
    gen = lv.init_params(jax.random.key(0), plain)["generator"]
    ids = jnp.arange(V_SMALL)
    perm = lv.id_permutation(3, V_SMALL)
    assert sorted(np.asarray(perm).tolist()) == list(range(V_SMALL)) and not np.array_equal(perm, ids)
    np.testing.assert_array_equal(lv.generate_embeddings(gen, ids, permuted),
                                  lv.generate_embeddings(gen, perm, plain))


def test_id_permutation_survives_a_retrace_for_another_id_bucket():
    lv.id_permutation.cache_clear()
    cfg = small_config(id_permutation_seed=5)
    step = lv.make_train_step(cfg)
    state = lv.init_state(jax.random.key(0), cfg)
    for size in (None, 128):  # two distinct-id bucket sizes: the step is traced twice
        state, metrics = step(state, lv.prepare_batch(random_tokens(size or 0, 4, 16, V_SMALL), size=size))
        assert np.isfinite(float(metrics["loss"]))


def test_embed_norm_makes_the_body_blind_to_the_embeddings_scale():
    cfg = small_config("dense", embed_norm="rms", embed_init_std=0.5)
    params = lv.init_params(jax.random.key(0), cfg)
    assert np.std(params["embed"]) == pytest.approx(0.5, rel=0.02)
    tokens = jnp.asarray(random_tokens(0, 2, 16, V_SMALL)[:, :-1])
    scaled = {**params, "embed": params["embed"] * 10}
    np.testing.assert_allclose(lv.forward(scaled, tokens, cfg), lv.forward(params, tokens, cfg), atol=1e-4)
    plain = small_config("dense", embed_init_std=0.5)
    assert not np.allclose(lv.forward(scaled, tokens, plain), lv.forward(params, tokens, plain), atol=1e-4)


def test_embed_init_std_follows_init_std_and_is_refused_for_leviathan():
    import dataclasses

    dense = small_config("dense")
    assert dense.embed_init_std == dense.init_std == 0.02  # the default: 0 in the field, resolved to init_std
    table = lv.init_params(jax.random.key(0), dense)["embed"]
    normal = jax.random.normal(jax.random.split(jax.random.key(0), 9)[8], table.shape, jnp.float32)
    np.testing.assert_array_equal(table, 0.02 * normal)  # bit for bit as before the change
    wide = small_config("dense", init_std=0.05)
    assert wide.embed_init_std == 0.05
    assert np.std(lv.init_params(jax.random.key(0), wide)["embed"]) == pytest.approx(0.05, rel=0.02)
    assert small_config("dense", init_std=0.05, embed_init_std=0.21).embed_init_std == 0.21
    assert lv.Config(**dataclasses.asdict(wide)) == wide  # a saved config loads as itself
    with pytest.raises(ValueError, match="embed_init_std 0.21 sets the dense table's init std"):
        small_config(embed_init_std=0.21)
    with pytest.raises(ValueError, match="must be 0 .follow init_std. or more"):
        small_config("dense", embed_init_std=-0.1)
    assert small_config(embed_init_std=0.02).embed_init_std == 0.02  # as the committed Leviathan configs say
    for run in ("leviathan-s0", "dense-std0.21-s0"):
        recorded = json.loads((Path(__file__).parent / "results/lab" / run / "config.json").read_text())["config"]
        assert lv.Config(**recorded).embed_init_std == recorded["embed_init_std"]


# --- 5-9. loss, optimizer, distinct-id batches, train step, training loop -------------------------


def test_prepare_batch_and_bucket_sizes():
    tokens = np.array([[5, 3, 5, 9], [9, 9, 3, 1]])
    batch = lv.prepare_batch(tokens)
    assert batch["ids"][:2].tolist() == [3, 5] and batch["ids"][2] == 9 and len(batch["ids"]) == 64
    np.testing.assert_array_equal(batch["ids"][batch["inverse"]], tokens[:, :-1])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    fixed = lv.prepare_batch(tokens, size=200)
    assert len(fixed["ids"]) == 200 and (fixed["ids"][fixed["inverse"]] == tokens[:, :-1]).all()
    with pytest.raises(ValueError, match="do not fit"):
        lv.prepare_batch(tokens, size=2)
    sizes = [lv.bucket_size(n) for n in (1, 64, 65, 81, 1000, 1025, 40_000)]
    assert sizes == [64, 64, 80, 96, 1024, 1280, 40_960]
    for n in range(1, 5000, 7):  # never too small, at most 25% padding above the smallest bucket
        assert n <= lv.bucket_size(n) <= max(64, 1.25 * n) and lv.bucket_size(n, 3) % 3 == 0


@pytest.mark.parametrize("model", lv.MODELS)
def test_weight_decay_mask(model):
    mask = lv.decay_mask(lv.param_shapes(small_config(model)))
    layers = mask["layers"]
    assert all(layers[n] for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    assert not layers["attn_norm"] and not layers["mlp_norm"] and not mask["final_norm"]
    assert mask["head"]
    if model == "dense":
        assert mask["embed"]
    else:
        gen = mask["generator"]
        assert gen["W"] and gen["Wout"]
        assert not any(gen[n] for n in ("codebooks", "delta", "ln_scale", "ln_bias"))


def test_lr_schedule_warms_up_then_decays_to_ten_percent():
    cfg = small_config(lr=1e-3, warmup_steps=10, steps=110)
    lr = lv.lr_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1e-4)  # the first step already learns
    assert float(lr(4)) == pytest.approx(5e-4) and float(lr(9)) == pytest.approx(1e-3)
    assert float(lr(59)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)  # half-way down the cosine
    assert float(lr(109)) == pytest.approx(1e-4) and float(lr(500)) == pytest.approx(1e-4)


def test_a_tiny_model_overfits_one_batch():
    cfg = small_config(vocab_size=64, lr=3e-3, warmup_steps=5, steps=80)
    batch = lv.prepare_batch(random_tokens(3, 4, cfg.seq_len, 64))
    state = lv.init_state(jax.random.key(4), cfg)
    step = lv.make_train_step(cfg)
    losses = []
    for _ in range(cfg.steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 3.9 and losses[-1] < 0.5, (losses[0], losses[-1])
    assert int(state["step"]) == cfg.steps


def assert_same_update(before, results, lr):
    """Same loss and gradient norm, and parameter updates equal to within 5% of the learning rate.
    Adam's first step is g / (|g| + eps): for the generator's W, whose gradients are ~1e-8 at init,
    float32 rounding in g becomes a few percent of the update; everywhere else it is far smaller."""
    (s1, m1), (s2, m2) = results
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for p0, p1, p2 in zip(*(jax.tree_util.tree_leaves(s["params"]) for s in (before, s1, s2))):
        d1, d2 = np.asarray(p1) - np.asarray(p0), np.asarray(p2) - np.asarray(p0)
        assert np.abs(d1).max() > 0.1 * lr  # the step did move this parameter
        np.testing.assert_allclose(d1, d2, rtol=0, atol=0.05 * lr)


@pytest.mark.parametrize("model", lv.MODELS)
def test_micro_batches_give_the_same_update_as_one_big_batch(model):
    tokens = random_tokens(4, 8, 16, V_SMALL)
    before = jax.device_get(lv.init_state(jax.random.key(5), small_config(model)))
    cfgs = [small_config(model, batch_size=8, micro_batch=m) for m in (0, 2)]  # 8 at once, or 4 x 2
    grads = [lv.compute_grads(before["params"], lv.prepare_batch(tokens), c)[1] for c in cfgs]
    assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    results = [lv.make_train_step(c)(jax.device_put(before), lv.prepare_batch(tokens)) for c in cfgs]
    assert_same_update(before, results, cfgs[0].lr)


def test_jit_equals_no_jit():
    cfg = small_config()
    batch = lv.prepare_batch(random_tokens(5, 4, cfg.seq_len, V_SMALL))
    state = lv.init_state(jax.random.key(6), cfg)
    eager_state, eager_metrics = lv.train_step(jax.tree.map(jnp.copy, state), batch, cfg)
    jit_state, jit_metrics = lv.make_train_step(cfg)(state, batch)
    np.testing.assert_allclose(float(jit_metrics["loss"]), float(eager_metrics["loss"]), rtol=1e-6)
    assert_trees_close(jit_state["params"], eager_state["params"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", lv.MODELS)
def test_two_device_mesh_gives_the_same_loss_as_one_device(model):
    assert len(jax.devices()) >= 2, "XLA_FLAGS should give this test two CPU devices"
    tokens = random_tokens(4, 8, 16, V_SMALL)
    cfg = small_config(model, batch_size=8, micro_batch=2)
    before = jax.device_get(lv.init_state(jax.random.key(5), cfg))
    results = []
    for mesh in (None, lv.make_mesh(jax.devices()[:2])):
        n_devices = 1 if mesh is None else 2
        state = jax.device_put(before) if mesh is None else lv.init_state(jax.random.key(5), cfg, mesh)
        batch = lv.shard_batch(lv.prepare_batch(tokens, n_devices), mesh)
        results.append(lv.make_train_step(cfg, mesh)(state, batch))
    assert len(results[1][0]["params"]["head"].sharding.device_set) == 2
    assert_same_update(before, results, cfg.lr)


def test_52_layers_compile_to_the_same_program_as_6():
    """Layers run under lax.scan: the 52-layer preset's compiled step is the 6-layer one with other
    shapes (one loop over layers), not 52 copies of a block, so compile time does not grow with depth."""
    batch = lv.prepare_batch(random_tokens(7, 1, 16, V_SMALL))
    programs = {}
    for size in ("60M", "109M"):  # 6 and 52 layers, same width; a small vocabulary keeps it light
        cfg = lv.config(size, seq_len=16, vocab_size=V_SMALL)
        compiled = jax.jit(lv.loss_fn, static_argnums=2).lower(lv.param_shapes(cfg), batch, cfg).compile()
        programs[cfg.n_layers] = compiled.as_text()
    assert set(programs) == {6, 52}
    assert len(programs[52]) < 1.05 * len(programs[6])
    assert programs[52].count("while") == programs[6].count("while") > 0


def test_train_loop_reports_metrics_and_loss_falls():
    cfg = small_config(vocab_size=64, lr=3e-3, warmup_steps=3, steps=30)
    data = np.tile(np.arange(64, dtype=np.int32), 20)  # a perfectly predictable stream
    rng = np.random.default_rng(0)

    def batches():
        while True:
            starts = rng.integers(0, len(data) - 17, 4)
            yield lv.prepare_batch(np.stack([data[s:s + 17] for s in starts]))

    logged = []
    state = lv.train_loop(lv.init_state(jax.random.key(8), cfg), batches(), lv.make_train_step(cfg),
                          cfg.steps, wants_state=lambda step: step in (10, 15),
                          on_step=lambda s, m, st, info: logged.append((s, st and int(st["step"]), m)))
    # every step is reported once, in order; wants_state() and the last step get the state, which is
    # then that step's (the state is donated to the next step, so it is read inside on_step); the
    # others are read a step late, without it
    assert [s for s, _, _ in logged] == list(range(1, 31))
    assert [(s, st) for s, st, _ in logged if st is not None] == [(10, 10), (15, 15), (30, 30)]
    assert int(state["step"]) == 30
    assert all(set(m) == {"loss", "lr", "grad_norm"} and isinstance(m["loss"], float) for _, _, m in logged)
    assert logged[-1][2]["loss"] < logged[0][2]["loss"] - 1.0


def test_train_loop_passes_info_and_lets_the_callback_see_the_state_before_a_loader_error():
    cfg = small_config(vocab_size=64, steps=10)
    tokens = random_tokens(9, 4, cfg.seq_len, 64)

    def batches():
        for i in range(5):
            yield lv.prepare_batch(tokens), f"position {i}"
        raise OSError("shard went away")

    seen = []
    with pytest.raises(OSError, match="went away"):
        lv.train_loop(lv.init_state(jax.random.key(9), cfg), batches(), lv.make_train_step(cfg),
                      cfg.steps, on_step=lambda s, m, st, info: seen.append(
                          (s, info, st is not None and int(st["step"]))))
    # all 5 loaded batches were used, and the last step's state came before the error
    assert seen == [(i + 1, f"position {i}", False) for i in range(4)] + [(5, "position 4", 5)]


# --- 11. a trained model -------------------------------------------------------------------------


@pytest.mark.parametrize("model", lv.MODELS)
def test_parameter_file_holds_the_parameters_alone_and_predicts_the_same(model, tmp_path):
    cfg = small_config(model)
    params = lv.init_params(jax.random.key(3), cfg)
    path = str(tmp_path / "params.npz")
    lv.save_params(path, params, cfg, step=7, tokenizer="bytes")
    with np.load(path) as f:  # the layout the README describes
        assert "layers/wq" in f.files and "head" in f.files and "meta" in f.files
        assert ("generator/codebooks" if model == "leviathan" else "embed") in f.files
        assert all(f[name].dtype == np.float32 for name in f.files if name != "meta")
    loaded, loaded_cfg, meta = lv.load_params(path)
    assert loaded_cfg == cfg and meta == {"step": 7, "tokenizer": "bytes"}
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    assert_trees_close(loaded, params, rtol=0, atol=0)
    tokens = jnp.asarray(random_tokens(0, 2, 16, V_SMALL)[:, :-1])
    np.testing.assert_array_equal(lv.forward(loaded, tokens, cfg), lv.forward(params, tokens, cfg))


def next_token_logits(params, cfg, ids):
    """The plain path's logits for the token after `ids`, seeing at most the last seq_len: (V,)."""
    context = jnp.asarray(ids[-cfg.seq_len:], jnp.int32)[None]
    return np.asarray(lv.forward(params, context, cfg)[0, -1])


@pytest.fixture(scope="module")
def sampling_model():
    cfg = small_config(seq_len=8)
    params = lv.init_params(jax.random.key(1), cfg)
    params["head"] = params["head"] * 50  # spread the logits so that "the most likely" is clear-cut
    return params, cfg, np.array([3, 1, 4, 1, 5], np.int32)


def test_sampling_at_temperature_zero_is_the_greedy_continuation(sampling_model):
    params, cfg, prompt = sampling_model
    new = np.asarray(lv.sample(params, cfg, prompt, 12, jax.random.key(0), 0.0))  # 17 > seq_len: cropped
    ids = list(prompt)
    for token in new:
        logits = next_token_logits(params, cfg, ids)
        assert logits[token] >= logits.max() - 1e-4
        ids.append(int(token))
    near_zero = lv.sample(params, cfg, prompt, 12, jax.random.key(5), 1e-6)
    np.testing.assert_array_equal(near_zero, new)


def test_sampling_is_seeded_and_top_k_keeps_to_the_k_most_likely(sampling_model):
    params, cfg, prompt = sampling_model
    draw = functools.partial(lv.sample, params, cfg, prompt, 12, temperature=3.0, top_k=3, n_valid=500)
    first, again, other = (np.asarray(draw(jax.random.key(s))) for s in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    for new in (first, other):
        ids = list(prompt)
        for token in new:
            logits = next_token_logits(params, cfg, ids)
            assert token < 500 and logits[token] >= np.sort(logits[:500])[-3] - 1e-4
            ids.append(int(token))


def test_the_demo_ends_with_a_sample_of_what_it_learned(capsys):
    lv.demo(steps=2, batch_size=2, seq_len=16)
    out = capsys.readouterr().out
    assert "what it writes after 2 steps (temperature 0.8, top-k 20):\ndef " in out


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """A run folder holding only params.npz, with the byte tokenizer."""
    run = tmp_path_factory.mktemp("sample_run")
    cfg = small_config(vocab_size=BYTES.n_vocab, seq_len=8)
    lv.save_params(str(run / "params.npz"), lv.init_params(jax.random.key(0), cfg), cfg, step=1, tokenizer="bytes")
    return run


def test_sample_py_prints_the_same_text_for_the_same_seed(sample_run, capsys):
    import sample

    outputs = []
    for _ in range(2):
        assert sample.main([str(sample_run), "--prompt", "The", "--tokens", "10", "--seed", "0"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("The") and len(outputs[0]) > 4


@pytest.mark.parametrize("case", ["no run", "prompt"])
def test_sample_py_errors_are_one_sentence(case, sample_run, tmp_path, capsys):
    import sample

    argv, named = {"no run": ([str(tmp_path)], "holds no params.npz"),
                   "prompt": ([str(sample_run), "--prompt", "a <|endoftext|> b"], "cannot encode the prompt")}[case]
    assert sample.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


# ================================================================================================
# data.py
# ================================================================================================

MINIPILE = os.path.join("corpus", "minipile")  # the bundled corpus, relative to the repository root
BYTES = lv.byte_encoding()  # token id = byte value, EOT = 256: easy to read in assertions
EOT = 256


def doc(text, name="Test"):
    return {"text": text, "meta": {"pile_set_name": name}}


def write_shard(path, lines, frames=1):
    """Write JSON lines (dicts, or raw strings written as they are). A .zst path is compressed into
    `frames` zstd frames cut at arbitrary bytes, so lines straddle frame boundaries."""
    data = b"".join((json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n" for x in lines)
    if str(path).endswith(".zst"):
        cuts = np.linspace(0, len(data), frames + 1).astype(int)
        data = b"".join(zstandard.ZstdCompressor().compress(data[a:b]) for a, b in zip(cuts, cuts[1:]))
    path.write_bytes(data)
    return str(path)


def drain(next_item):
    """Every item of next_item() until it returns None."""
    items = []
    while (item := next_item()) is not None:
        items.append(item)
    return items


def all_batches(stream):
    return drain(stream.next_batch)


def words(n, seed=0):
    """n documents of random words (so that they compress poorly and differ)."""
    rng = np.random.default_rng(seed)
    vocab = ["river", "stone", "light", "quick", "seven", "under", "paper", "green", "north", "field"]
    return [doc(" ".join(rng.choice(vocab, rng.integers(3, 40)))) for _ in range(n)]


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
    stream = data.BatchStream([path], Recording(), len(text), 1, shuffle_buffer=0, vocab_size=257,
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
    """The state attached to batch k, saved in a checkpoint file and loaded into a new stream, continues
    with batch k+1 -- mid-shard, mid-frame, across shards and epochs -- with the same hash and counts."""
    monkeypatch.setattr(data, "GROUP_CHARS", 300)  # read in small groups, so positions fall mid-shard
    shards = [write_shard(tmp_path / f"{i}.jsonl.zst", words(15, seed=i), frames=3) for i in range(2)]

    def make():
        return data.BatchStream(shards, BYTES, 15, 3, seed=3, shuffle_buffer=10, vocab_size=257)

    reference = make()
    expected = [reference.next_batch() for _ in range(120)]
    assert reference.epoch >= 1  # the run went round the shards more than once
    loader = data.Loader(make(), depth=4)
    items = [next(loader) for _ in range(100)]
    loader.close()
    for k in (1, 17, 55, 100):
        batch, state = items[k - 1]
        assert np.array_equal(batch["targets"], expected[k - 1][:, 1:])
        path = str(tmp_path / "ckpt.npz")
        train.save_checkpoint(path, {"w": np.ones(3, np.float32)}, state, {"step": k})
        meta, leaves, loaded = train.load_checkpoint(path)
        assert meta["step"] == k and np.array_equal(leaves[0], np.ones(3))
        resumed = make()
        resumed.load_state(loaded)
        assert all(np.array_equal(resumed.next_batch(), b) for b in expected[k:])
        assert resumed.data_hash == reference.data_hash
        assert np.array_equal(resumed.counts, reference.counts)


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


def test_text_files_and_folders_are_documents(tmp_path):
    (tmp_path / "notes" / "deep").mkdir(parents=True)
    (tmp_path / "notes" / "b.md").write_text("# Title\n\nsecond")
    (tmp_path / "notes" / "deep" / "a.txt").write_text("first")
    (tmp_path / "notes" / "skip.png").write_bytes(b"\x89PNG")
    (tmp_path / "notes" / "blank.txt").write_text("\n\n")
    sources = data.resolve_sources([str(tmp_path / "notes")], "--data")
    assert [os.path.relpath(s, tmp_path) for s in sources] == [
        os.path.join("notes", x) for x in ("b.md", "blank.txt", os.path.join("deep", "a.txt"))]
    stream = data.BatchStream(sources, BYTES, seq_len=100, batch_size=1, shuffle_buffer=0, loop=False)
    stream.next_sequence()
    assert stream.pending.tolist() == [*b"# Title\n\nsecond", EOT, *b"first", EOT]  # a file is a document
    assert stream.documents == {"text": 2} and stream.bad_lines == 0


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


# --- HTTP ------------------------------------------------------------------------------------------


class ShardServer:
    """Serves a folder on 127.0.0.1 with ETag and Range/If-Range. The first `drops` responses are cut
    off after `drop_after` bytes; `version` is the ETag, so changing it imitates a changed file."""

    def __init__(self, root, drops=0, drop_after=0):
        self.root, self.drops, self.drop_after, self.version, self.starts = root, drops, drop_after, 1, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = os.path.join(server.root, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    return self.send_error(404)
                data, etag = open(path, "rb").read(), f'"v{server.version}"'
                start = 0
                if self.headers.get("Range") and self.headers.get("If-Range") == etag:
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                server.starts.append(start)
                self.send_response(206 if start else 200)
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.drops:
                    server.drops -= 1
                    self.wfile.write(data[start:start + server.drop_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                else:
                    self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    server = ShardServer(str(tmp_path))
    yield server
    server.close()


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
    reader = data.HTTPReader(f"{server.url}/web.jsonl.zst")
    assert len(reader.read(1 << 20)) == server.drop_after
    server.version = 2  # the file changes on the server while we read it
    with pytest.raises(data.DataError, match="changed on the server"):
        reader.read(1 << 20)


# --- evaluation by token frequency -------------------------------------------------------------------


def test_frequency_buckets_cut_sorted_ids_into_equal_token_mass():
    assert data.frequency_buckets(np.ones(10, np.int64)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    #         id: 0   1   2   3   4  5  6  7  8   9   (sorted: 1, 9, 4, 2, 3, 6, 7, then the unseen)
    counts = np.array([0, 50, 10, 10, 30, 0, 5, 5, 0, 40])  # mass before each: 0, 50, 90, 120, ... of 150
    assert data.frequency_buckets(counts).tolist() == [4, 0, 4, 4, 3, 4, 4, 4, 4, 1]  # bucket 2 empty
    assert data.frequency_buckets(np.zeros(6, np.int64)).tolist() == [4] * 6  # nothing seen yet

    rng = np.random.default_rng(0)
    counts = rng.zipf(1.3, 5000) * (rng.random(5000) < 0.8)  # a long tail, a fifth never seen
    buckets = data.frequency_buckets(counts)
    assert buckets.shape == (5000,) and set(np.unique(buckets)) <= set(range(5))  # a partition
    order = np.lexsort((np.arange(5000), -counts))
    assert np.all(np.diff(buckets[order]) >= 0)  # more frequent ids never in a rarer bucket
    assert np.all(buckets[counts == 0] == 4)
    mass = np.bincount(buckets, weights=counts, minlength=5) / counts.sum()
    assert np.all(mass[mass > 0] <= 0.2 + counts.max() / counts.sum())


def test_bucket_losses_average_to_the_validation_loss():
    rng = np.random.default_rng(1)
    targets, losses = rng.integers(0, 50, (6, 32)), rng.random((6, 32)) * 10
    buckets = data.frequency_buckets(np.r_[rng.integers(1, 100, 40), np.zeros(10, int)])
    summary = data.loss_summary(losses, targets, buckets, n_bytes=500)
    n, loss = np.array(summary["val_bucket_tokens"]), summary["val_bucket_loss"]
    assert n.sum() == targets.size
    weighted = sum(k * x for k, x in zip(n, loss) if x is not None) / n.sum()
    assert weighted == pytest.approx(summary["val_loss"], rel=1e-12)
    assert summary["val_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    assert summary["val_bpb"] == pytest.approx(losses.sum() / 500 / np.log(2), rel=1e-12)
    assert all((x is None) == (k == 0) for k, x in zip(n, loss))


def test_input_buckets_group_positions_by_the_input_token():
    counts = np.array([100, 50, 10, 5, 1, 0])  # ids 0 .. 5: bucket 0 holds id 0 (most frequent)
    buckets = data.frequency_buckets(counts)
    inputs = np.array([[0, 0, 5, 3]])  # positions read ids 0, 0, 5 (unseen: the last bucket), 3
    targets = np.array([[5, 3, 0, 0]])
    losses = np.array([[1.0, 2.0, 7.0, 4.0]])
    summary = data.loss_summary(losses, targets, buckets, n_bytes=4, inputs=inputs)
    assert summary["val_input_bucket_tokens"][0] == 2 and summary["val_input_bucket_loss"][0] == 1.5
    assert summary["val_input_bucket_tokens"][-1] == 1 + (buckets[3] == 4)
    assert summary["val_bucket_tokens"][0] == 2 and summary["val_bucket_loss"][0] == 5.5  # by target
    n, loss = summary["val_input_bucket_tokens"], summary["val_input_bucket_loss"]
    assert sum(k * x for k, x in zip(n, loss) if k) / sum(n) == pytest.approx(summary["val_loss"])


@pytest.mark.slow
def test_loader_throughput_measures_the_whole_loader():
    shards = [os.path.join(HERE, MINIPILE, f"{i:02d}.jsonl.zst") for i in (0, 1)]
    result = data.loader_throughput(shards, "o200k_base", seq_len=64, batch_size=8, seconds=None,
                                     max_batches=5, shuffle_buffer=32)
    assert result["batches"] == 5 and result["tokens"] == 5 * 8 * 65
    assert result["tokens_per_s"] > 1000 and result["fill_seconds"] > 0


# ================================================================================================
# train.py
# ================================================================================================


def test_batches_do_not_depend_on_the_model(tmp_path):
    path = write_shard(tmp_path / "m.jsonl.zst", words(100))
    streams = {}
    for model in ("leviathan", "dense"):
        args = train.parse_args(["--size", "tiny", "--model", model, "--data", path, "--tokenizer", "bytes",
                                 "--seq-len", "16", "--batch-size", "4", "--shuffle-buffer", "8"])
        streams[model] = train.make_stream(args, BYTES, [path])
    for _ in range(20):
        assert np.array_equal(streams["leviathan"].next_batch(), streams["dense"].next_batch())
    assert streams["leviathan"].data_hash == streams["dense"].data_hash != "0" * 32


def test_resume_refuses_other_settings_but_accepts_a_new_lr_or_length():
    old = {"config": {"lr": 1e-3, "steps": 8, "warmup_steps": 1, "seq_len": 32}, "seed": 0, "data": ["a"]}
    longer = {"config": {"lr": 5e-4, "steps": 20, "warmup_steps": 2, "seq_len": 32}, "seed": 0, "data": ["a"]}
    assert train.changed_settings(old, longer) == []
    other = {"config": {"lr": 1e-3, "steps": 8, "warmup_steps": 1, "seq_len": 64}, "seed": 1, "data": ["b"]}
    assert train.changed_settings(old, other) == ["seed", "data", "seq_len"]
    knob = {**old, "config": {**old["config"], "gen_knots": 32, "embed_norm": "rms"}}  # fields added later
    assert train.changed_settings(old, knob) == ["embed_norm"]  # a missing field counts as its default


def test_counts_on_the_command_line():
    assert [train.count(x) for x in ("2000000", "2e6", "2M", "1.5B", "64k")] == [2_000_000] * 3 + [
        1_500_000_000, 64_000]
    args = train.parse_args(["--tokens", "2B", "--size", "tiny"])
    assert args.tokens == 2_000_000_000 and args.eval_tokens == 2_000_000


def test_every_numeric_flag_refuses_zero_negative_and_non_numbers(capsys):
    """Each numeric flag of train.py with 0, -1 and a word: refused at parse time with exit 2 and one
    sentence naming the flag and its range, or (0 only, where 0 has a meaning) accepted as 0."""
    zero_means = {"--warmup", "--seed", "--eval-every", "--shuffle-buffer", "--process-id"}  # 0: none, or the first
    numeric = [a.option_strings[0] for a in train.parser()._actions if a.type not in (None, train.config_setting)]
    assert len(numeric) == 20 and zero_means < set(numeric)
    for flag in numeric:
        for value in ("0", "-1", "many"):
            argv = [flag, value] + (["--eval-tokens", "1M"] if flag == "--seq-len" else [])
            if value == "0" and flag in zero_means:
                assert getattr(train.parse_args(argv), flag[2:].replace("-", "_")) == 0
                continue
            with pytest.raises(SystemExit) as exit_:
                train.parse_args(argv)
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and err.count("\n") == 1, (flag, value, err)
            assert f"argument {flag}: must be" in err and repr(value) in err
            assert "or more" in err or "above 0" in err


def test_set_takes_any_config_field_by_its_type(capsys):
    args = train.parse_args(["--size", "tiny", "--set", "gen_combine=sum", "--set", "gen_knots=8",
                             "--set", "remat=false", "--set", "embed_init_std=0.2"])
    assert args.set == [("gen_combine", "sum"), ("gen_knots", 8), ("remat", False), ("embed_init_std", 0.2)]
    cfg, _ = train.build_config(args, BYTES, 1)
    assert (cfg.gen_combine, cfg.gen_knots, cfg.remat, cfg.embed_init_std) == ("sum", 8, False, 0.2)
    for bad, named in (("nonsense=1", "'nonsense=1' is not FIELD=VALUE"), ("gen_knots=abc", "takes int values"),
                       ("gen_knots", "is not FIELD=VALUE"), ("lr=1", "lr has its own flag, --lr")):
        with pytest.raises(SystemExit) as exit_:
            train.parse_args(["--set", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and named in err, err
        assert "lr" in err if "own flag" in named else "gen_combine, id_permutation_seed" in err
    with pytest.raises(train.BadFlag, match="--set: unknown gen_combine 'max'"):
        train.build_config(train.parse_args(["--size", "tiny", "--set", "gen_combine=max"]), BYTES, 1)


@pytest.mark.parametrize("argv, named", [
    (["--micro-batch", "16", "--batch-size", "8"], "--micro-batch 16 is larger than --batch-size 8"),
    (["--eval-tokens", "100", "--seq-len", "128"], "--eval-tokens 100 is less than one sequence"),
])
def test_impossible_flag_combinations_exit_2(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and named in err


@pytest.mark.slow
def test_bad_numbers_exit_2_at_once_and_leave_no_run_folder(tmp_path):
    for flags in (["--steps", "0"], ["--steps", "-5"], ["--batch-size", "0"], ["--seq-len", "0"],
                  ["--log-every", "0"], ["--micro-batch", "3", "--batch-size", "4"]):
        out = tmp_path / "run"
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "train.py", "--size", "tiny", "--out", str(out),
                                 "--data", f"{MINIPILE}/val.jsonl.zst", "--val-data", f"{MINIPILE}/val.jsonl.zst",
                                 "--tokenizer", "bytes", "--eval-tokens", "1k", *flags],
                                cwd=HERE, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        assert result.returncode == 2, (flags, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert flags[0] in result.stderr and not out.exists()
        print(f"{' '.join(flags)}: exit 2 after {seconds:.1f} s")


def test_a_signal_at_the_last_step_says_the_run_is_complete(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(train, "log_step", lambda *a, **k: None)
    monkeypatch.setattr(train, "save_checkpoint", lambda path, state, data_state, meta: saved.append(meta["step"]))
    monkeypatch.setattr(lv, "save_params", lambda *a, **k: None)
    monkeypatch.setattr(train, "all_finite", lambda state: True)
    run = train.Run(lv.config("tiny", steps=4), None, str(tmp_path), {"tokenizer": "bytes"},
                    {"log": 10, "eval": 0, "checkpoint": 10}, stop_at=4, start=0, val=None, loader=None,
                    first=None, signal=signal.SIGTERM)
    metrics, info = {"loss": 2.0, "grad_norm": 1.0}, ({}, 1)
    with pytest.raises(train.Interrupted, match="after step 4, the last: the run is complete and saved"):
        train.on_step(run, 4, metrics, {"params": {}}, info)
    with pytest.raises(train.Interrupted, match="step 3, which is checkpointed; rerun .* --resume"):
        train.on_step(run, 3, metrics, {"params": {}}, info)
    assert saved == [4, 3]


# --- bad input: one sentence on stderr, non-zero exit ---------------------------------------------------

VAL = os.path.join(HERE, MINIPILE, "val.jsonl.zst")


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/00.jsonl.zst"


@pytest.mark.parametrize("case", ["missing", "no match", "corrupt", "truncated", "404", "no network",
                                  "resume without checkpoint", "existing run", "unknown tokenizer"])
def test_bad_input_ends_with_one_sentence(case, tmp_path, server, monkeypatch, capsys):
    monkeypatch.setattr(data, "HTTP_BACKOFF", 0.01)
    good = write_shard(tmp_path / "good.jsonl.zst", words(50))
    blob = open(good, "rb").read()
    (tmp_path / "corrupt.jsonl.zst").write_bytes(b"this is not zstd" * 10)
    (tmp_path / "truncated.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    os.makedirs(tmp_path / "existing")
    (tmp_path / "existing" / "ckpt.npz").write_bytes(b"a checkpoint to keep")
    source, extra, named = {
        "missing": (str(tmp_path / "nope.jsonl.zst"), [], "nope.jsonl.zst does not exist"),
        "no match": (str(tmp_path / "*.jsonl.gz"), [], "matches no file"),
        "corrupt": (str(tmp_path / "corrupt.jsonl.zst"), [], "corrupt.jsonl.zst is corrupt"),
        "truncated": (str(tmp_path / "truncated.jsonl.zst"), [], "truncated.jsonl.zst is truncated"),
        "404": (f"{server.url}/absent.jsonl.zst", [], "absent.jsonl.zst answered HTTP 404"),
        "no network": (closed_port_url(), [], "could not be read after"),
        "resume without checkpoint": (good, ["--resume"], "--resume found no checkpoint"),
        "existing run": (good, ["--out", str(tmp_path / "existing")], "already holds a run"),
        "unknown tokenizer": (good, ["--tokenizer", "nope"], "unknown --tokenizer 'nope'"),
    }[case]
    argv = ["--size", "tiny", "--data", source, "--val-data", VAL, "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--shuffle-buffer", "4", "--eval-tokens", "64", "--out", str(tmp_path / "run"),
            *extra]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err
    assert not os.path.exists(tmp_path / "run" / "ckpt.npz")
    assert (tmp_path / "existing" / "ckpt.npz").read_bytes() == b"a checkpoint to keep"


@pytest.mark.slow
def test_unknown_size_lists_the_valid_ones():
    result = subprocess.run([sys.executable, "train.py", "--size", "7B"], cwd=HERE, capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "'7B'" in result.stderr and all(name in result.stderr for name in lv.SIZES)


@pytest.mark.slow
def test_a_fresh_clone_trains_offline_on_text_files_it_is_given(tmp_path):
    """The README's offline form in a folder with no ../shared beside it: only the three scripts, the
    o200k file in the user's tiktoken cache, two text files written here."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("train.py", "data.py", "leviathan.py"):
        (clone / name).write_bytes(Path(HERE, name).read_bytes())
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    o200k = "fb374d419588a4632f3f557e76b4b70aebbca790"  # tiktoken's cache name of o200k_base
    (cache / o200k).write_bytes(Path(os.environ["TIKTOKEN_CACHE_DIR"], o200k).read_bytes())
    rng = np.random.default_rng(0)
    vocab = "the a river stone light ran under seven green fields and north of paper".split()
    for name, n in (("book.txt", 4000), ("other.txt", 600)):
        text = "\n\n".join(" ".join(rng.choice(vocab, 60)) + "." for _ in range(n // 60))
        (tmp_path / name).write_text(text)
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "train.py", "--size", "tiny", "--data", str(tmp_path / "book.txt"),
                             "--val-data", str(tmp_path / "other.txt"), "--steps", "5", "--batch-size", "4",
                             "--seq-len", "64", "--eval-tokens", "256", "--out", "runs/text",
                             "--set", "gen_combine=sum", "--set", "gen_knots=8"],
                            cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    log = read_log(clone / "runs" / "text")
    assert log[-1]["step"] == 5 and log[-1]["val_loss"] < log[0]["train_loss"]
    assert set(log[-1]["documents"]) == {"text"}  # one file, one document (read again each epoch)
    params, cfg, meta = lv.load_params(str(clone / "runs" / "text" / "params.npz"))
    assert meta == {"step": 5, "tokenizer": "o200k_base"} and cfg.steps == 5
    config = json.loads((clone / "runs" / "text" / "config.json").read_text())
    assert config["set"] == {"gen_combine": "sum", "gen_knots": 8} == {k: config["config"][k] for k in config["set"]}


# --- end to end: train.py --size tiny on ../shared/minipile ------------------------------------------

RUN = ["--size", "tiny", "--data", f"{MINIPILE}/00.jsonl.zst", f"{MINIPILE}/01.jsonl.zst",
       "--val-data", f"{MINIPILE}/val.jsonl.zst", "--steps", "8", "--batch-size", "4", "--seq-len", "32",
       "--shuffle-buffer", "64", "--eval-every", "4", "--eval-tokens", "512", "--log-every", "1",
       "--ckpt-every", "2", "--lr", "3e-3"]
TIMING = ("tok_per_s", "mfu", "elapsed_s")  # the only fields that may differ between identical runs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Subprocess environment: one device, and a compilation cache shared by this file's runs."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("XLA_FLAGS", None)
    return env


def start(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=HERE, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for_step(proc, out, step, timeout=120):
    """Wait until the run has logged `step`; it must still be running then."""
    deadline = time.time() + timeout
    log = os.path.join(out, "log.jsonl")
    while not (os.path.exists(log) and any(r["step"] >= step for r in read_log(out))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not reach the step in time"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted 8-step run: the end-to-end test and the resume test compare against it."""
    out = str(tmp_path_factory.mktemp("reference"))
    proc = start([*RUN, "--out", out], env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out, stdout


@pytest.mark.slow
def test_end_to_end_tiny_run_on_minipile(reference):
    out, stdout = reference
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    for r in log:
        assert {"step", "tokens", "train_loss", "lr", "grad_norm", "tok_per_s", "data_hash"} <= r.keys()
        assert r["tokens"] == r["step"] * 4 * 32 and len(r["data_hash"]) == 32
    assert len({r["data_hash"] for r in log}) == 8
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.3  # the loss falls
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[1]["val_loss"] < evals[0]["val_loss"]
    for r in evals:
        assert sum(r["val_bucket_tokens"]) == 512 and len(r["val_bucket_loss"]) == 5
        assert sum(r["val_input_bucket_tokens"]) == 512 and len(r["val_input_bucket_loss"]) == 5
        weighted = sum(n * x for n, x in zip(r["val_bucket_tokens"], r["val_bucket_loss"]) if n) / 512
        assert weighted == pytest.approx(r["val_loss"], rel=1e-9)
        assert 0 < r["val_bpb"] < r["val_loss"] / np.log(2)  # more than one byte per token
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    cfg = lv.Config(**config["config"])  # the run can be rebuilt from config.json
    assert (cfg.model, cfg.steps, cfg.seq_len, cfg.batch_size, cfg.lr) == ("leviathan", 8, 32, 4, 3e-3)
    assert config["model"] == "leviathan" and config["size"] == "tiny" and config["seed"] == 0
    assert config["n_params"] == lv.count_params(lv.param_shapes(cfg)) and config["val_tokens"] == 512
    assert train.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"] == 8
    assert "MFU n/a" in stdout and "ETA" in stdout


@pytest.mark.slow
def test_ctrl_c_and_kill_9_then_resume_match_the_uninterrupted_run(reference, tmp_path, env):
    out = str(tmp_path / "run")

    def checkpointed():
        return train.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"]

    proc = start([*RUN, "--out", out], env)  # 1. Ctrl-C: saves the step it finishes and exits
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in stderr and stderr.count("\n") == 1
    stopped = checkpointed()
    assert stopped == max(r["step"] for r in read_log(out)) < 6

    proc = start([*RUN, "--out", out, "--resume"], env)  # 2. resumed, then kill -9 two steps later
    wait_for_step(proc, out, stopped + 2)
    proc.kill()
    proc.wait()
    resumed_from = checkpointed()  # the last checkpoint the killed run wrote
    assert stopped <= resumed_from < 8

    proc = start([*RUN, "--out", out, "--resume"], env)  # 3. resumed to the end
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"resuming at step {resumed_from}" in stdout

    def strip(log):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in log]

    assert strip(read_log(out)) == strip(read_log(reference[0]))  # losses and data_hash bitwise equal


@pytest.mark.slow
def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, env):
    out = str(tmp_path / "nan")
    proc = start(["--size", "tiny", "--model", "dense", "--tokenizer", "bytes",
                  "--data", f"{MINIPILE}/00.jsonl.zst", "--val-data", f"{MINIPILE}/val.jsonl.zst",
                  "--steps", "6", "--batch-size", "4", "--seq-len", "32",
                  "--shuffle-buffer", "16", "--eval-tokens", "256", "--log-every", "1", "--ckpt-every", "1",
                  "--lr", "1e30", "--out", out], env)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and stderr.count("\n") == 1 and "Traceback" not in stderr
    bad = int(re.search(r"diverged by step (\d+)", stderr).group(1))  # every step before it was saved
    assert bad >= 2 and f"last good checkpoint (step {bad - 1}) is kept" in stderr
    assert train.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"] == bad - 1
    assert [r["step"] for r in read_log(out)] == list(range(1, bad))

RESULTS = os.path.join(HERE, "results", "tiny-minipile")
# --- several processes: jax.distributed on 127.0.0.1, one CPU device each ----------------------------

DIST = [*RUN[:RUN.index("--steps")], "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--shuffle-buffer",
        "64", "--eval-every", "3", "--eval-tokens", "512", "--log-every", "1", "--ckpt-every", "2", "--lr", "3e-3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def spawned():
    """The processes a test starts; any still running at its end (a failed test) are killed."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_processes(spawned, out, env, port, extra=(), ids=(0, 1)):
    flags = ["--out", out, "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             *extra]
    procs = [start([*DIST, *flags, "--process-id", str(i)], env) for i in ids]
    spawned += procs
    return procs


def finish(procs, timeout=900):
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs
    return [stdout for stdout, _ in outputs]


def printed_hashes(stdout):
    return re.findall(r"step (\d+)/\d+ .*\| data (\w+) \|", stdout)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices_and_resume_after_kill_9(tmp_path, env, spawned):
    out = str(tmp_path / "two")
    stdouts = finish(start_processes(spawned, out, env, free_port()))
    assert len(printed_hashes(stdouts[0])) == 6 and printed_hashes(stdouts[0]) == printed_hashes(stdouts[1])
    two = read_log(out)
    assert [r["step"] for r in two] == list(range(1, 7)) and sorted(os.listdir(out)) == [
        "ckpt.npz", "config.json", "data-6-p0.npz", "data-6-p1.npz", "log.jsonl", "params.npz"]

    one_out = str(tmp_path / "one")  # one process, two devices, reading both shares itself
    proc = start([*DIST, "--out", one_out, "--data-shares", "2"],
                 {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    spawned.append(proc)
    finish([proc])
    for a, b in zip(read_log(one_out), two, strict=True):
        assert a["data_hash"] == b["data_hash"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), rel=1e-6)

    killed = str(tmp_path / "killed")  # kill -9 both after step 3, then resume both
    procs = start_processes(spawned, killed, env, free_port())
    wait_for_step(procs[0], killed, 3, timeout=600)
    for proc in procs:
        proc.kill()
        proc.wait()
    finish(start_processes(spawned, killed, env, free_port(), extra=["--resume"]))
    resumed = read_log(killed)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed, two):
        assert a["data_hash"] == b["data_hash"] and a["train_loss"] == b["train_loss"]
        assert a.get("val_loss") == b.get("val_loss")


@pytest.mark.slow
@pytest.mark.parametrize("victim,how", [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGKILL)])
def test_when_one_process_dies_the_other_ends_with_one_sentence(tmp_path, env, spawned, victim, how):
    """SIGKILL: its sockets close, and a collective fails at once. SIGSTOP (a machine that froze):
    a collective with it waits forever, and only the missing heartbeat ends the survivor. Process 0
    hosts jax.distributed's coordination service: when it dies, JAX itself ends the others at once,
    with its own message and a stack trace (README: a known limit), so only the time is checked."""
    out = str(tmp_path / "run")
    procs = start_processes(spawned, out, env, free_port(), extra=["--steps", "400", "--eval-every", "0",
                                                                   "--peer-timeout", "10"])
    wait_for_step(procs[0], out, 3, timeout=600)  # step 2's checkpoint is written before step 3 is logged
    saved = train.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"]
    procs[victim].send_signal(how)
    t0 = time.time()
    survivor = procs[1 - victim]
    _, stderr = survivor.communicate(timeout=120)
    seconds = time.time() - t0
    assert survivor.returncode != 0 and seconds < 60, (seconds, stderr)
    assert train.load_checkpoint(os.path.join(out, "ckpt.npz"))[0]["step"] >= saved  # a whole checkpoint
    print(f"the survivor ended {seconds:.1f} s after the signal")
    if victim != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert survivor.returncode == 1 and stderr.strip() == errors[0], stderr
        assert "rerun every process with --resume" in errors[0]


@pytest.mark.slow
def test_an_unreachable_coordinator_is_named_in_one_sentence(tmp_path, env, spawned):
    port = free_port()
    (proc,) = start_processes(spawned, str(tmp_path / "run"), env, port, extra=["--join-timeout", "3"], ids=(1,))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"the coordinator at 127.0.0.1:{port} could not be reached" in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error: ")] == [stderr.strip().splitlines()[-1]]
    assert not os.path.exists(tmp_path / "run")


# The committed CPU-tier runs' first steps must come out the same. 10 keeps CI short (steps 1 and 10
# are logged); LEVIATHAN_REPRODUCE_STEPS=25 checks the first 25 (steps 1, 10, 20, 25).
REPRODUCED_STEPS = int(os.environ.get("LEVIATHAN_REPRODUCE_STEPS", "10"))


@pytest.mark.slow
@pytest.mark.parametrize("model", lv.MODELS)
def test_cpu_tier_reproduces_the_committed_losses(model, tmp_path, env):
    """The README's CPU tier, same command and seed, stopped after REPRODUCED_STEPS steps (on the same
    schedule), logs the train losses of results/tiny-minipile to within 1e-6, on the same tokens."""
    committed = read_log(os.path.join(RESULTS, f"tiny-{model}"))
    with open(os.path.join(RESULTS, f"tiny-{model}", "config.json")) as f:
        command = json.load(f)["command"][1:]
    out = command.index("--out")
    command[out + 1] = str(tmp_path / "run")
    proc = start([*command, "--stop-after", str(REPRODUCED_STEPS)], env)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    expected = [r for r in committed if r["step"] <= REPRODUCED_STEPS]
    got = {r["step"]: r for r in read_log(str(tmp_path / "run"))}
    assert [r["step"] for r in expected] == sorted(got) and len(expected) >= 2
    for r in expected:
        assert got[r["step"]]["data_hash"] == r["data_hash"]
        assert abs(got[r["step"]]["train_loss"] - r["train_loss"]) <= 1e-6, (r["step"], got[r["step"]])


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
    assert err.count("\n") == 1 and err.startswith(f"error: argument --b: it must be a finite number >= 0 "
                                                    f"(the fits' loss floor in nats/token), not '{bad}'")
    assert run_plot(capsys, tmp_path, "--b", "0")[0] == 0


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


# ================================================================================================
# bench.py
# ================================================================================================


@pytest.mark.slow
def test_bench_times_both_models_and_the_loader(capsys):
    import bench

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
    import bench

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
    import bench

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
