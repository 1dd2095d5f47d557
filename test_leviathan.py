"""Tests for leviathan.py (model, generator, optimizer, train step). CPU, offline.

Run: python -m pytest -q
"""

import os

# Two CPU devices for the data-parallel test; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# Offline tiktoken: read the o200k/cl100k files from ../shared when they are there.
if os.path.isdir("../shared/tiktoken"):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "../shared/tiktoken")

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import leviathan as lv

V_SMALL = 512  # a small vocabulary keeps most tests fast; the generator itself is full size


def small_config(model="leviathan", **overrides):
    fields = dict(vocab_size=V_SMALL, seq_len=16, batch_size=4, steps=100, dtype="float32")
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
    assert (cfg.vocab_size, cfg.base, cfg.k * cfg.base) == (200_376, 59, 177)


def test_decompose_is_a_bijection_over_the_whole_vocabulary():
    ids = np.arange(200_376)
    digits = np.asarray(lv.decompose(ids, 59, 3))  # (V, 3)
    assert digits.shape == (200_376, 3) and digits.min() == 0 and digits.max() == 58
    np.testing.assert_array_equal(digits[:, 0] * 59**2 + digits[:, 1] * 59 + digits[:, 2], ids)
    assert len(np.unique(digits, axis=0)) == 200_376
    np.testing.assert_array_equal(np.asarray(lv.decompose(np.array([[60]]), 59, 3)), [[[0, 1, 1]]])


def test_tokenizer_vocabularies():
    import tiktoken

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


def test_prepare_batch_and_bucket_sizes():
    tokens = np.array([[5, 3, 5, 9], [9, 9, 3, 1]])
    batch = lv.prepare_batch(tokens)
    assert batch["ids"][:2].tolist() == [3, 5] and batch["ids"][2] == 9 and len(batch["ids"]) == 64
    np.testing.assert_array_equal(batch["ids"][batch["inverse"]], tokens[:, :-1])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    sizes = [lv.bucket_size(n) for n in (1, 64, 65, 81, 1000, 1025, 40_000)]
    assert sizes == [64, 64, 80, 96, 1024, 1280, 40_960]
    for n in range(1, 5000, 7):  # never too small, at most 25% padding above the smallest bucket
        assert n <= lv.bucket_size(n) <= max(64, 1.25 * n) and lv.bucket_size(n, 3) % 3 == 0


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
    assert lv.param_counts(lv.config(size, "dense")) == dense
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


# --- 5-7. loss, optimizer, train step ------------------------------------------------------------


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
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)
    assert float(lr(110)) == pytest.approx(1e-4) and float(lr(500)) == pytest.approx(1e-4)


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


def test_52_layer_preset_compiles():
    cfg = lv.config("109M", seq_len=16, vocab_size=V_SMALL)  # 52 layers; small vocab keeps it light
    assert cfg.n_layers == 52
    shapes = lv.param_shapes(cfg)
    batch = lv.prepare_batch(random_tokens(7, 1, 16, V_SMALL))
    lowered = jax.jit(lv.loss_fn, static_argnums=2).lower(shapes, batch, cfg)
    assert lowered.compile() is not None


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
                          cfg.steps, log_every=10, callback=lambda s, st, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 10, 20, 30] and int(state["step"]) == 30
    assert "compile_s" in logged[0][1] and all(m["tok_per_s"] > 0 for _, m in logged)
    assert logged[-1][1]["loss"] < logged[0][1]["loss"] - 1.0
