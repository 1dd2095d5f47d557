"""Leviathan: a language model whose input embedding table is a small continuous generator.

A from-scratch, single-file JAX reference for Batley & Saha (2026), "A Separable Architecture for
Continuous Token Representation in Language Models" (arXiv 2601.22040).

A LLaMA-style transformer normally looks each token id up in a (vocab_size, d_model) table: 51M
parameters at d_model 256 with a 200k vocabulary. Leviathan writes the id in base 59 with three
digits, adds three tiny codebooks (177 rows in all) into a seed vector, and turns the seed into an
embedding with a separable, spline-based generator (2.4M parameters). Everything else is unchanged.

The file reads in the order the idea is explained:
   1. Config and sizes
   2. Base-b decomposition of token ids                 i -> (i1, i2, i3)
   3. Embedding generator                               digits -> seed z -> 8 separable heads -> e
   4. Transformer body (LLaMA-style)                    RMSNorm, RoPE, causal attention, SwiGLU, head
   5. Loss                                              next-token cross-entropy
   6. Optimizer                                         AdamW, clipping, warmup + cosine decay
   7. Distinct-id batches                               the host finds each batch's distinct ids
   8. Train step                                        one jax.jit
   9. Training loop
  10. Devices and speed accounting                      mesh, MFU
  11. A trained model                                   its parameter file, sampling
  12. `python leviathan.py`: the size table and a small offline demo

Parameters are a plain dict of arrays; the forward pass is a function of (params, tokens).

`forward(params, tokens, cfg)` is the plain reference path: embed every token, run the transformer.
Training computes the same numbers faster with four tricks, each marked "speed:" where it is used,
and each checked against the plain path by a test:
  - distinct ids: the generator runs once per distinct id of the step, not once per position
    (section 7, `compute_grads`);
  - lax.scan over generator heads and over layers: one traced copy, so compile time does not grow
    with depth (`generate_embeddings`, `transformer`);
  - jax.checkpoint: each block's activations (and each generator head's, where `recompute_heads`
    says so) are recomputed in the backward pass instead of stored;
  - micro-batches: the body runs over slices of the batch under lax.scan, accumulating gradients,
    and each device's rows split locally (`split_micro_batches`).
One more is a switch (cfg.sparse_mixing, on by default): each head computed from its coordinates'
3 non-zero spline knots of 32 (`sparse_head`), with a backward pass of its own, checked against the
dense form (`head_factors`, `generator_head`), which stays the reference.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# ------------------------------------------------------------------------------------------------
# 1. Config and sizes
# ------------------------------------------------------------------------------------------------

MODELS = ("leviathan", "dense")
DTYPES = ("float32", "bfloat16")  # matmul dtypes of the body (no float16: it would need loss scaling)
ATTENTION = ("xla", "cudnn")  # jax.nn.dot_product_attention implementations
EMBED_NORMS = ("none", "rms")
GEN_COMBINES = ("product", "sum")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that defines a model and its optimisation. Frozen, so it can be a static jit arg."""

    model: str = "leviathan"  # "leviathan" (generated embeddings) or "dense" (lookup-table twin)
    # transformer body
    vocab_size: int = 200_376  # tiktoken o200k_base, padded as in the paper
    d_model: int = 256  # residual stream width
    n_layers: int = 6  # transformer blocks
    n_heads: int = 4  # attention heads (head dim = d_model / n_heads)
    seq_len: int = 512  # tokens per training sequence (paper: 512)
    mlp_mult: int = 4  # SwiGLU hidden size = mlp_mult * d_model
    rope_theta: float = 10_000.0  # rotary position embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon (paper unknown: LLaMA's value)
    init_std: float = 0.02  # std of every weight matrix at init (paper: N(0, 0.02^2))
    # the lab's ablations (train.py --set FIELD=VALUE); the defaults are the paper's model
    embed_norm: str = "none"  # "rms": an RMSNorm with learned scale on the input embeddings (either model)
    embed_init_std: float = 0.0  # std of the dense table at init; 0: follow init_std (dense only)
    gen_combine: str = "product"  # "product" (paper): a mode is the product of its factors; "sum": their mean
    id_permutation_seed: int = 0  # 0: decompose ids as they are; else a fixed random permutation first
    # embedding generator (paper's v1, reconstructed)
    n_digits: int = 3  # base-b digits per token id (paper: k = 3 coordinates)
    d_seed: int = 128  # seed dimension: z = C1[i1] + C2[i2] + C3[i3]
    gen_heads: int = 8  # independent generator heads, summed
    gen_rank: int = 64  # rank-1 separable modes per head
    gen_knots: int = 32  # uniform knots of the quadratic B-spline basis on [0, 1]
    sparse_mixing: bool = True  # speed: each head from its coordinates' 3 non-zero knots (sparse_head)
    gen_sigmoid_scale: float = 2.0  # u = sigmoid(LayerNorm(W z) / 2): squashes a seed into (0, 1)
    spline_init_std: float = 0.1  # spline coefficients S = 1 + 0.1 N(0, 1)
    ln_eps: float = 1e-5  # epsilon of the generator's LayerNorm
    # compute
    dtype: str = "float32"  # matmul dtype of the body ("bfloat16" on GPU/TPU); params stay float32
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla", or "cudnn" (NVIDIA)
    remat: bool = True  # recompute each block's activations in the backward pass (saves memory)
    # optimisation (paper: AdamW, clipping, warmup, cosine decay, 512 x 512 tokens per step)
    batch_size: int = 512  # sequences per optimizer step
    micro_batch: int = 0  # sequences per forward/backward pass, all devices together (0: whole batch)
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to 10% of the peak
    warmup_steps: int = 0  # linear warmup from 0 to the peak
    steps: int = 10_000  # length of the schedule (optimizer steps)
    b1: float = 0.9  # AdamW beta1
    b2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (see decay_mask)
    grad_clip: float = 1.0  # global gradient-norm clipping

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}: use one of {', '.join(ATTENTION)}")
        if self.embed_norm not in EMBED_NORMS:
            raise ValueError(f"unknown embed_norm {self.embed_norm!r}: use one of {', '.join(EMBED_NORMS)}")
        if self.gen_combine not in GEN_COMBINES:
            raise ValueError(f"unknown gen_combine {self.gen_combine!r}: use one of {', '.join(GEN_COMBINES)}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "mlp_mult", "n_digits",
                     "d_seed", "gen_heads", "gen_rank", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be 1 or more")
        if self.gen_knots < 3:
            raise ValueError(f"gen_knots is {self.gen_knots}; a quadratic B-spline needs 3 knots or more")
        if self.id_permutation_seed < 0:
            raise ValueError(f"id_permutation_seed is {self.id_permutation_seed}; it must be 0 (off) or more")
        if not self.embed_init_std >= 0:
            raise ValueError(f"embed_init_std is {self.embed_init_std}; it must be 0 (follow init_std) or more")
        # Leviathan has no table: a value other than 0 or init_std would be silently ignored, so it is
        # refused. Equal to init_std is accepted: the committed Leviathan configs record 0.02 = init_std.
        if self.model == "leviathan" and self.embed_init_std not in (0.0, self.init_std):
            raise ValueError(f"embed_init_std {self.embed_init_std} sets the dense table's init std, and "
                             f"Leviathan has no table (its generator follows init_std); use it with "
                             f"model dense, or leave it unset")
        if self.embed_init_std == 0.0:  # resolved here, so a saved config records the std the table got
            object.__setattr__(self, "embed_init_std", self.init_std)

    @property
    def base(self):
        return digit_base(self.vocab_size, self.n_digits)


# The paper's sizes, reconstructed from its parameter counts. The name is the Leviathan model's size;
# "iso-body" pairs share the body, "isoparametric" pairs spend the saved table on more layers.
SIZES = {
    #        d_model heads  dense layers      Leviathan layers     peak lr
    "tiny": dict(d_model=64, n_heads=2, dense_layers=2, leviathan_layers=2, lr=1e-3),
    "60M": dict(d_model=256, n_heads=4, dense_layers=6, leviathan_layers=6, lr=6e-4),
    "109M": dict(d_model=256, n_heads=4, dense_layers=6, leviathan_layers=52, lr=6e-4),
    "230M": dict(d_model=512, n_heads=8, dense_layers=6, leviathan_layers=30, lr=4e-4),
    "410M": dict(d_model=1024, n_heads=16, dense_layers=12, leviathan_layers=12, lr=3e-4),
    "421M": dict(d_model=768, n_heads=12, dense_layers=12, leviathan_layers=28, lr=3e-4),
}

# Vocabulary sizes the paper pads to; other tiktoken encodings use their own n_vocab.
PADDED_VOCAB = {"o200k_base": 200_376}


def default_dtype():
    """bfloat16 matmuls on an accelerator, float32 on CPU (where bfloat16 is slow and imprecise)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def config(size="tiny", model="leviathan", **overrides):
    """The Config of a preset: config("60M"), config("60M", "dense"), config("tiny", lr=3e-3)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")
    s = SIZES[size]
    fields = dict(model=model, d_model=s["d_model"], n_heads=s["n_heads"],
                  n_layers=s[f"{model}_layers"], lr=s["lr"], dtype=default_dtype())
    return Config(**{**fields, **overrides})


def padded_vocab(enc):
    """Vocabulary size for a tiktoken encoding: the paper's padded 200,376 for o200k, else n_vocab."""
    return PADDED_VOCAB.get(enc.name, enc.n_vocab)


def byte_encoding():
    """A tiktoken encoding of raw bytes (256 tokens + <|endoftext|>), built offline: no download."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 256})


# ------------------------------------------------------------------------------------------------
# 2. Base-b decomposition: a token id becomes n_digits digits, each indexing a small codebook
# ------------------------------------------------------------------------------------------------


def digit_base(vocab_size, n_digits):
    """Smallest b with b**n_digits >= vocab_size, in exact integer arithmetic (59 for 200,376 and 3)."""
    b = max(1, round(vocab_size ** (1.0 / n_digits)))  # a float guess, then exact integer correction
    while b**n_digits < vocab_size:
        b += 1
    while b > 1 and (b - 1) ** n_digits >= vocab_size:
        b -= 1
    return b


def decompose(ids, base, n_digits):
    """Token ids (...) -> digits (..., n_digits), most significant first: i = i1*b^2 + i2*b + i3."""
    powers = jnp.asarray([base ** (n_digits - 1 - r) for r in range(n_digits)], dtype=jnp.int32)
    return (jnp.asarray(ids, jnp.int32)[..., None] // powers) % base


# ------------------------------------------------------------------------------------------------
# 3. The embedding generator
#
# The paper's v1 as we reconstruct it (the paper gives the shapes, not every detail):
#   seed     z = C1[i1] + C2[i2] + C3[i3]                                  (d_seed,)
#   per head l = 1..gen_heads:
#     u      = sigmoid(LayerNorm_l(W_l z) / 2)                             (d_seed,)  in (0, 1)
#     basis  B[d, g] = quadratic B-spline g evaluated at u[d]              (d_seed, knots)
#     phi    phi[d, r] = sum_g B[d, g] S_l[d, g, r]                        (d_seed, rank)
#     modes  m[r] = prod_d phi[d, r]      (KHRONOS-style separable product) (rank,)
#     e_l    = m @ Wout_l                                                  (d_model,)
#   e = sum_l e_l
# It depends on the token id alone, so a train step evaluates it once per distinct id (section 7).
# ------------------------------------------------------------------------------------------------


def init_generator(key, cfg):
    """Generator parameters; every per-head array is stacked along a leading gen_heads axis."""
    H, ds, G, R, D = cfg.gen_heads, cfg.d_seed, cfg.gen_knots, cfg.gen_rank, cfg.d_model
    k1, k2, k3, k4 = jax.random.split(key, 4)
    std = cfg.init_std
    out_std = std / math.sqrt(H)  # the sum over H heads then starts with std init_std per mode
    return {
        "codebooks": std * jax.random.normal(k1, (cfg.n_digits, cfg.base, ds)),  # C_1..C_k
        "W": std * jax.random.normal(k2, (H, ds, ds)),  # seed projection per head, no bias
        "ln_scale": jnp.ones((H, ds)),
        "ln_bias": jnp.zeros((H, ds)),
        # spline coefficients S = 1 + delta: stored as delta so "no weight decay" keeps S free
        "delta": cfg.spline_init_std * jax.random.normal(k3, (H, ds, G, R)),
        "Wout": out_std * jax.random.normal(k4, (H, R, D)),  # modes -> d_model
    }


def layer_norm(x, scale, bias, eps):
    """LayerNorm over the last axis with a learned scale and shift."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))  # speed: the backward pass below
def spline_basis(u, n_knots):
    """Quadratic uniform B-spline basis on n_knots knots spanning [0, 1]: (...) -> (..., n_knots).

    Basis g is the cardinal quadratic B-spline centred on knot g/(n_knots-1):
    0.75 - t^2 for |t| < 0.5, 0.5 (1.5 - |t|)^2 for 0.5 <= |t| < 1.5, else 0 (t in knot units).
    At most three are non-zero at any point; rows are normalised to sum to 1 (only the two ends
    need it, where the knots beyond [0, 1] are missing).
    """
    knots = jnp.linspace(0.0, 1.0, n_knots)  # (G,)
    t = jnp.abs(u[..., None] - knots) * (n_knots - 1)  # (..., G) distance in knot units
    # speed: "else 0" as a maximum; a where's 0.0 became a full (..., G) array on XLA's CPU backend
    b = jnp.where(t < 0.5, 0.75 - t**2, 0.5 * jnp.maximum(1.5 - t, 0.0) ** 2)
    # The row sum in closed form: 1 minus the missing outer knot's 0.5 (0.5 - distance)^2 within half
    # a knot of either end. Cheaper than b.sum(-1), a reduction over (..., G) forward and backward.
    x = u * (n_knots - 1)  # (...) position in knot units
    missing = 0.5 * (jnp.maximum(0.5 - x, 0.0) ** 2 + jnp.maximum(x - (n_knots - 1.5), 0.0) ** 2)
    return b / (1.0 - missing)[..., None]


def _spline_basis_fwd(u, n_knots):
    return spline_basis(u, n_knots), u


def _spline_basis_bwd(n_knots, u, g):
    """speed: d B / d u is non-zero on spline_window's 3 knots only, so the backward pass takes those
    3 of g (..., G) and differentiates the window's 3 values; autodiff of the formula above runs on
    all G knots (bench.py --profile, the tiny step: the generator's ops 477 ms before, 398 after).
    A test compares the two. (A custom_vjp has no forward-mode derivative: jax.jvp/jacfwd refuse it.)"""
    first, _, window_vjp = spline_window_vjp(u, n_knots)
    return window_vjp(in_window(g, first))


spline_basis.defvjp(_spline_basis_fwd, _spline_basis_bwd)


FACTOR_FLOOR = 1e-30  # the reference floors |phi| here: a zero factor gives ~0 with a finite gradient
PRODUCT_CHUNK = 8  # factors multiplied directly: 8 factors in [1e-3, 1e3] stay inside float32 (1e+-24)


def separable_product_reference(phi):
    """prod over the first axis of phi (d, ...) -> (...), as sign * exp(sum log|phi|): the definition.

    A plain product of 128 factors under- or overflows float32 on its way; the sum of logs does not.
    The sign is the parity of the negative factors. Like the reference codes, the log-sum is not
    capped: a product beyond float32's range becomes inf, and the trainer stops on a non-finite loss.
    The tests check separable_product, the form training uses, against this one.
    """
    negatives = jnp.sum(phi < 0, axis=0)  # integer: no gradient flows through the sign
    sign = 1.0 - 2.0 * (negatives % 2)
    log_abs = jnp.sum(jnp.log(jnp.maximum(jnp.abs(phi), FACTOR_FLOOR)), axis=0)
    return sign * jnp.exp(log_abs)


@jax.custom_vjp
def separable_product(phi):
    """prod over the first axis of phi (d, ...) -> (...): separable_product_reference, computed faster.

    speed: no factor needs a log (nor its backward the chain rule through log and exp). Chunks of
    PRODUCT_CHUNK factors are multiplied directly (for factors in [1e-3, 1e3] they cannot over- or
    underflow); each chunk product is split as mantissa * 2^exponent, the d/8 mantissas (0.5 <= |m| < 1,
    so their product >= 2^-(d/8)) are multiplied and the exponents added, so only the final result
    can overflow (to inf, uncapped). Signs multiply exactly; a zero factor gives exactly 0. It is also
    more accurate: ~1e-6 relative, where the log-sum loses up to ~4e-5 on widely spread factors.
    """
    d = phi.shape[0]
    phi = jnp.pad(phi, [(0, -d % PRODUCT_CHUNK)] + [(0, 0)] * (phi.ndim - 1), constant_values=1.0)
    chunks = jnp.prod(phi.reshape(-1, PRODUCT_CHUNK, *phi.shape[1:]), axis=1)  # (d/8, ...)
    mantissa, exponent = jnp.frexp(chunks)  # chunks = mantissa * 2^exponent
    # speed: the d/8 mantissas multiplied one by one, not by jnp.prod: XLA's CPU backend runs that
    # reduce over the leading axis as one slow fusion, several times the cost of this elementwise chain.
    return jnp.ldexp(functools.reduce(jnp.multiply, mantissa), sum(exponent))


def _separable_product_fwd(phi):
    modes = separable_product(phi)
    return modes, (phi, modes)


def _separable_product_bwd(residuals, g):
    """d prod / d phi_d = prod / phi_d: one multiply and divide per factor. A mode with a zero factor
    is exactly 0 and so gets gradient 0, the zero factor included (as with the reference's floor)."""
    phi, modes = residuals
    return (g * modes / jnp.where(phi == 0, 1.0, phi),)


separable_product.defvjp(_separable_product_fwd, _separable_product_bwd)


# Full float32 matmuls in the generator (no TF32 on GPUs): 128 factors would multiply their rounding errors.
f32_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=4)
def id_permutation(seed, vocab_size):
    """A fixed random permutation of the ids (the lab's id_permutation_seed): (V,) int32, in NumPy
    (a constant of every program that uses it; a cached jax array could be a tracer of another)."""
    return np.random.default_rng(seed).permutation(vocab_size).astype(np.int32)


def seeds(gen, ids, cfg):
    """Token ids (U,) -> seeds z = C1[i1] + C2[i2] + C3[i3]: (U, d_seed)."""
    if cfg.id_permutation_seed:  # the lab: does the tokenizer's id order matter?
        ids = jnp.asarray(id_permutation(cfg.id_permutation_seed, cfg.vocab_size))[ids]
    digits = decompose(ids, cfg.base, cfg.n_digits)  # (U, n_digits)
    return gen["codebooks"][jnp.arange(cfg.n_digits), digits].sum(-2)


def spline_mixing(basis, S):
    """phi[d, u, r] = sum_g B[d, u, g] S[d, g, r]: basis (d, U, G), S (d, G, R) -> (d, U, R).

    The reference form: one batched matmul per seed coordinate, (U, G) @ (G, R)."""
    return f32_matmul(basis, S)


def spline_window(u, n_knots):
    """spline_basis's non-zero part: u (...) -> the first of 3 consecutive knots (...) int32 and
    their basis values (..., 3); every other knot's value is 0. Same formula, same knots."""
    x = u * (n_knots - 1)  # (...) position in knot units
    first = jnp.clip(jnp.round(x).astype(jnp.int32) - 1, 0, n_knots - 3)  # (...)
    knots = jnp.linspace(0.0, 1.0, n_knots)[first[..., None] + jnp.arange(3)]  # (..., 3)
    t = jnp.abs(u[..., None] - knots) * (n_knots - 1)  # (..., 3) distance in knot units
    # the same values as spline_basis's; a where here: its maximum made the H200's 60M step 3% slower
    b = jnp.where(t < 0.5, 0.75 - t**2, jnp.where(t < 1.5, 0.5 * (1.5 - t) ** 2, 0.0))
    # the row sum's closed form, as in spline_basis
    missing = 0.5 * (jnp.maximum(0.5 - x, 0.0) ** 2 + jnp.maximum(x - (n_knots - 1.5), 0.0) ** 2)
    return first, b / (1.0 - missing)[..., None]


def in_window(x, first):
    """x's entries at spline_window's 3 knots: x (..., G), first (...) -> (..., 3)."""
    return jnp.take_along_axis(x, first[..., None] + jnp.arange(3), axis=-1)


def spline_window_vjp(u, n_knots):
    """spline_window(u) and the VJP of its weights in u: (first, weights, vjp). first is integer: no gradient."""
    def weights_of(u):
        first, weights = spline_window(u, n_knots)
        return weights, first  # first rides along (has_aux), not differentiated
    weights, vjp, first = jax.vjp(weights_of, u, has_aux=True)
    return first, weights, vjp


def knot_rows(S, knot):
    """S (d, G, R) at one knot per coordinate and id, knot (d, U) -> S[d, knot[d, u]]: (d, U, R)."""
    return jnp.take_along_axis(S, knot[..., None], axis=1, mode="promise_in_bounds")  # no bounds mask


def window_mixing(first, weights, S):
    """spline_mixing from spline_window's 3 knots: first (d, U), weights (d, U, 3), S (d, G, R) -> (d, U, R).
    Each coordinate's basis has 3 non-zero knots of G, so phi needs 3 rows of S: 3/G of the matmul's work."""
    return sum(weights[..., k, None] * knot_rows(S, first + k) for k in range(3))


@jax.custom_vjp
def sparse_head(u, S, Wout):
    """speed: generator_head's maths from coordinates u (d, U), spline coefficients S (d, G, R) and Wout
    (R, D) -> (U, D), its factors mixed from 3 knots (window_mixing); the product form only.

    The forward pass gathers 3 rows of S per factor, which XLA fuses into the product in the train
    step: the (d, U, R) factors are not written out. For the backward pass (below) it keeps u and the
    modes, not the factors: it gathers them again by the same sums and runs the dense form's two
    matmuls for S's and the basis' gradients (a 3-knot scatter-add is slower than them on XLA's CPU
    backend). Measured (bench.py), Leviathan / dense step time: tiny, 16 x 128, on a 2-core CPU
    1.08x (medians of 60 rounds), against 1.11-1.12x with the dense form; 60M, 512 x 512, on an H200
    (heads recomputed) 1.10x, against 1.15x. Tests check it against the dense form, against float64
    where a factor cancels, and against finite differences."""
    return _sparse_head_fwd(u, S, Wout)[0]


def _sparse_head_fwd(u, S, Wout):
    first, weights = spline_window(u, S.shape[1])
    modes = separable_product(window_mixing(first, weights, S))  # (U, R)
    return f32_matmul(modes, Wout), (u, S, Wout, modes)


def _sparse_head_bwd(residuals, g):
    u, S, Wout, modes = residuals
    first, weights, window_vjp = spline_window_vjp(u, S.shape[1])
    # The factors again, by the forward pass's own sums, which XLA compiles alike, so that modes / phi
    # is the product of the other factors (separable_product's backward) even where a factor cancels
    # to about 0; factors rebuilt another way (the matmul) round apart from the forward pass's, and
    # there that ratio is far off. A test checks it at XLA's default optimisation level.
    phi = window_mixing(first, weights, S)  # (d, U, R)
    d_phi = f32_matmul(g, Wout.T) * modes / jnp.where(phi == 0, 1.0, phi)  # a mode with a zero factor: 0
    basis = sum(weights[..., k, None] * jax.nn.one_hot(first + k, S.shape[1]) for k in range(3))  # (d, U, G)
    d_S = f32_matmul(jnp.swapaxes(basis, 1, 2), d_phi)  # (d, G, R)
    d_weights = in_window(f32_matmul(d_phi, jnp.swapaxes(S, 1, 2)), first)  # the basis' gradient at 3 knots
    return window_vjp(d_weights)[0], d_S, f32_matmul(modes.T, g)


sparse_head.defvjp(_sparse_head_fwd, _sparse_head_bwd)


def head_coordinates(head, z, cfg):
    """One head's coordinates: seeds (U, d_seed) -> u = sigmoid(LayerNorm(W z) / 2), (d_seed, U) in (0, 1)."""
    h = layer_norm(f32_matmul(z, head["W"]), head["ln_scale"], head["ln_bias"], cfg.ln_eps)  # (U, d_seed)
    return jax.nn.sigmoid(h / cfg.gen_sigmoid_scale).T  # (d_seed, U)


def head_factors(head, z, cfg):
    """One head's factors: seeds (U, d_seed) -> phi (d_seed, U, rank), the modes' 128 factors.

    The seed coordinate d leads, so the spline mixing is one batched matmul per coordinate,
    (U, G) @ (G, R), and the product over d runs over the leading axis."""
    u = head_coordinates(head, z, cfg)  # (d_seed, U) in (0, 1)
    basis = spline_basis(u, cfg.gen_knots)  # (d_seed, U, G)
    return spline_mixing(basis, 1.0 + head["delta"])  # phi[d, u, r] = sum_g B[d, u, g] S[d, g, r]


def uses_sparse_head(cfg):
    """cfg.sparse_mixing, for the paper's product of factors (the lab's "sum" combine mixes densely)."""
    return cfg.sparse_mixing and cfg.gen_combine == "product"


def generator_head(head, z, cfg):
    """One generator head: seeds (U, d_seed) -> its contribution to the embeddings (U, d_model)."""
    if uses_sparse_head(cfg):  # speed: the same maths from 3 knots of G
        return sparse_head(head_coordinates(head, z, cfg), 1.0 + head["delta"], head["Wout"])
    phi = head_factors(head, z, cfg)  # (d_seed, U, R)
    modes = separable_product(phi) if cfg.gen_combine == "product" else phi.mean(0)  # (U, R)
    return f32_matmul(modes, head["Wout"])  # (U, D)


def recompute_heads(cfg):
    """Whether each generator head runs again in the backward pass (jax.checkpoint) instead of keeping
    what its backward pass needs. The dense form always does: kept, its (d_seed, U, rank) factors
    would fill memory. sparse_head keeps far less (each head's coordinates, their LayerNorm's
    intermediates and its modes), and which is faster depends on the backend. Measured, Leviathan's
    step: on one H200 (bench.py --report, 60M, 512 x 512 tokens) 554 ms recomputed, 572 kept; on a
    2-core CPU (tiny, 16 x 128, timed in one process against the dense form's step) 1.05x its time
    recomputed, 0.96x kept. Other accelerators are unmeasured and take the H200's choice."""
    if not uses_sparse_head(cfg):
        return True
    return jax.default_backend() != "cpu"


def generate_embeddings(gen, ids, cfg):
    """The generator: token ids (U,) -> embeddings (U, d_model), in float32 whatever cfg.dtype."""
    z = seeds(gen, ids, cfg)  # (U, d_seed)
    heads = {name: gen[name] for name in ("W", "ln_scale", "ln_bias", "delta", "Wout")}
    # speed: heads run one after another (lax.scan), so only one head's (d_seed, U, rank) intermediates
    # are alive at a time, and are recomputed in the backward pass (checkpoint) where that is faster.
    head_fn = functools.partial(generator_head, cfg=cfg)
    if recompute_heads(cfg):
        head_fn = jax.checkpoint(head_fn)

    def add_head(e, head):
        return e + head_fn(head, z), None

    e, _ = jax.lax.scan(add_head, jnp.zeros((ids.shape[0], cfg.d_model), jnp.float32), heads)
    return e  # (U, D)


# The parameters that make the input embeddings: the generator, or the table it replaces.
EMBEDDING_PARAMS = {"leviathan": "generator", "dense": "embed"}


def embed(params, ids, cfg):
    """Input embeddings of token ids (...) -> (..., d_model): generated (Leviathan) or looked up (dense)."""
    if cfg.model == "dense":
        return params["embed"][ids]
    flat = jnp.asarray(ids).reshape(-1)
    return generate_embeddings(params["generator"], flat, cfg).reshape(*jnp.shape(ids), cfg.d_model)


# ------------------------------------------------------------------------------------------------
# 4. The transformer body (LLaMA-style): pre-norm RMSNorm, RoPE, causal attention, SwiGLU, no biases
# ------------------------------------------------------------------------------------------------


def init_params(key, cfg):
    """All parameters as a dict of float32 arrays. Blocks are stacked on a leading n_layers axis."""
    L, D, F, V = cfg.n_layers, cfg.d_model, cfg.mlp_mult * cfg.d_model, cfg.vocab_size
    keys = jax.random.split(key, 9)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * L)  # residual outputs scaled (GPT-2)

    def normal(key, shape, s):
        return s * jax.random.normal(key, shape, jnp.float32)

    params = {
        "layers": {
            "attn_norm": jnp.ones((L, D)),
            "wq": normal(keys[0], (L, D, D), std),
            "wk": normal(keys[1], (L, D, D), std),
            "wv": normal(keys[2], (L, D, D), std),
            "wo": normal(keys[3], (L, D, D), out_std),
            "mlp_norm": jnp.ones((L, D)),
            "w_gate": normal(keys[4], (L, D, F), std),
            "w_up": normal(keys[5], (L, D, F), std),
            "w_down": normal(keys[6], (L, F, D), out_std),
        },
        "final_norm": jnp.ones((D,)),
        "head": normal(keys[7], (D, V), std),  # untied output head
    }
    if cfg.model == "leviathan":
        params["generator"] = init_generator(keys[8], cfg)
    else:
        params["embed"] = normal(keys[8], (V, D), cfg.embed_init_std)  # the table Leviathan replaces
    if cfg.embed_norm == "rms":
        params["embed_norm"] = jnp.ones((D,))
    return params


def param_shapes(cfg):
    """The parameter pytree's shapes (jax.ShapeDtypeStruct), allocating nothing."""
    return jax.eval_shape(functools.partial(init_params, cfg=cfg), jax.random.key(0))


def count_params(tree):
    """Number of scalars in a pytree of arrays or shapes: count_params(param_shapes(cfg)) is a
    model's size (head, norms and generator included); count_params(params["generator"]) a part's."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_tables(seq_len, head_dim, theta):
    """cos and sin of the rotation angles m * theta^(-2j/head_dim): each (seq_len, head_dim/2)."""
    freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # (hd/2,)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freqs[None, :]  # (T, hd/2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate pairs (x[j], x[j + hd/2]) of x (B, T, N, hd) by the angle of their position."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, hd/2) each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def attention(layer, x, cos, sin, cfg):
    """Causal multi-head self-attention: (B, T, D) -> (B, T, D)."""
    B, T, D = x.shape
    N, dt = cfg.n_heads, jnp.dtype(cfg.dtype)
    q = (x @ layer["wq"].astype(dt)).reshape(B, T, N, D // N)  # (B, T, N, hd)
    k = (x @ layer["wk"].astype(dt)).reshape(B, T, N, D // N)
    v = (x @ layer["wv"].astype(dt)).reshape(B, T, N, D // N)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # softmax(q k^T / sqrt(hd) + causal mask) v, logits and softmax in float32 ("xla"); on NVIDIA
    # GPUs cfg.attention="cudnn" asks for cuDNN's fused (flash) kernel instead.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=(
        None if cfg.attention == "xla" else cfg.attention))  # (B, T, N, hd)
    return out.reshape(B, T, D) @ layer["wo"].astype(dt)


def mlp(layer, x, cfg):
    """SwiGLU feed-forward: (silu(x Wg) * (x Wu)) Wd, hidden size mlp_mult * d_model."""
    dt = jnp.dtype(cfg.dtype)
    gate = jax.nn.silu(x @ layer["w_gate"].astype(dt))  # (B, T, F)
    return (gate * (x @ layer["w_up"].astype(dt))) @ layer["w_down"].astype(dt)  # (B, T, D)


def block(x, layer, cos, sin, cfg):
    """One pre-norm transformer block on the float32 residual stream x (B, T, D)."""
    dt = jnp.dtype(cfg.dtype)
    x = x + attention(layer, rms_norm(x, layer["attn_norm"], cfg.norm_eps).astype(dt), cos, sin, cfg)
    x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], cfg.norm_eps).astype(dt), cfg)
    return x


def transformer(params, x, cfg):
    """Input embeddings (B, T, D) -> logits (B, T, V) in cfg.dtype. speed: layers run under
    lax.scan, so compile time does not grow with depth, and each block is recomputed in the backward
    pass (cfg.remat) instead of storing its activations."""
    if cfg.embed_norm == "rms":  # the lab: the embeddings at one scale, whichever model made them
        x = rms_norm(x, params["embed_norm"], cfg.norm_eps)
    cos, sin = rope_tables(x.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_theta)
    layer_fn = functools.partial(block, cos=cos, sin=sin, cfg=cfg)
    if cfg.remat:
        layer_fn = jax.checkpoint(layer_fn)
    x, _ = jax.lax.scan(lambda x, layer: (layer_fn(x, layer), None), x.astype(jnp.float32),
                        params["layers"])
    dt = jnp.dtype(cfg.dtype)
    return rms_norm(x, params["final_norm"], cfg.norm_eps).astype(dt) @ params["head"].astype(dt)


def forward(params, tokens, cfg):
    """Logits (B, T, V) for tokens (B, T): the plain reference path, every position embedded."""
    return transformer(params, embed(params, tokens, cfg), cfg)


# ------------------------------------------------------------------------------------------------
# 5. Loss: next-token cross-entropy over the whole padded vocabulary
# ------------------------------------------------------------------------------------------------


def cross_entropy(logits, targets):
    """Per-token cross-entropy in nats, in float32: (B, T, V), (B, T) -> (B, T)."""
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def table_losses(params, table, inverse, targets, cfg):
    """The one loss body: per-token losses (B, T) of positions whose embeddings are table[inverse].
    With table = embed(all ids) and inverse = the tokens, this is the plain path."""
    return cross_entropy(transformer(params, table[inverse], cfg), targets)  # (B, T)


def token_losses(params, batch, cfg):
    """Per-token losses (B, T) of a batch dict (section 7): embeddings once per distinct id."""
    table = embed(params, batch["ids"], cfg)  # (U, D)
    return table_losses(params, table, batch["inverse"], batch["targets"], cfg)


def loss_fn(params, batch, cfg):
    """Mean next-token cross-entropy (nats) over the batch."""
    return token_losses(params, batch, cfg).mean()


# ------------------------------------------------------------------------------------------------
# 6. Optimizer: AdamW with global-norm clipping, linear warmup and cosine decay to 10% of the peak
# ------------------------------------------------------------------------------------------------

# Matrices get weight decay; norms, codebooks and spline coefficients (delta) do not.
DECAYED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "head", "embed", "W", "Wout")


def decay_mask(params):
    """A pytree of booleans like params: True where AdamW applies weight decay."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in DECAYED, params)


def lr_schedule(cfg):
    """lr of optimizer step s = 0, 1, ...: linear warmup reaching cfg.lr at s = warmup_steps - 1
    (so the first step already learns), then cosine decay to cfg.lr * min_lr_ratio at s = steps - 1."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda step: schedule(step + 1)


def make_optimizer(cfg):
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def init_state(key, cfg, mesh=None):
    """Train state {"params", "opt_state", "step"}; replicated over the mesh if one is given."""
    def init(key):
        params = init_params(key, cfg)
        return {"params": params, "opt_state": make_optimizer(cfg).init(params), "step": jnp.zeros((), jnp.int32)}

    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(key)  # every process: the same values


# ------------------------------------------------------------------------------------------------
# 7. Distinct-id batches
#
# speed: the generator depends on the token id alone, so a step needs it once per distinct id. The
# host turns packed sequences into a batch dict while the device runs the steps before it:
#   ids      (U,)    sorted distinct input ids, padded to a size bucket so shapes stay static
#   inverse  (B, T)  position -> index into ids, so the embeddings are table[inverse]
#   targets  (B, T)  next token at each position
# ------------------------------------------------------------------------------------------------


def bucket_size(n, n_devices=1, smallest=64):
    """Static size for n distinct ids: the next of 64, 80, 96, 112, 128, 160, ... (powers of two and
    the quarter steps between them, so at most 25% padding and only a few compiled shapes), rounded
    up to a multiple of n_devices."""
    n = max(n, smallest)
    quarter = (1 << (n - 1).bit_length()) // 8  # a quarter of the power of two below n
    size = -(-n // quarter) * quarter
    return -(-size // n_devices) * n_devices


def prepare_batch(tokens, n_devices=1, size=None):
    """Packed sequences (B, T+1) -> the batch dict above (numpy, on the host). `size` fixes the
    padded length of ids (e.g. one size for all validation batches); default: bucket_size."""
    tokens = np.asarray(tokens)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    ids, inverse = np.unique(inputs, return_inverse=True)
    size = size or bucket_size(len(ids), n_devices)
    if size < len(ids) or size % n_devices:
        raise ValueError(f"{len(ids)} distinct ids do not fit a size of {size} on {n_devices} devices")
    # Padding repeats the last id: those rows are computed but never looked up, so get no gradient.
    ids = np.pad(ids, (0, size - len(ids)), mode="edge")
    return {"ids": ids.astype(np.int32), "inverse": inverse.reshape(inputs.shape).astype(np.int32),
            "targets": targets.astype(np.int32)}


# ------------------------------------------------------------------------------------------------
# 8. The train step: one jax.jit
# ------------------------------------------------------------------------------------------------

def split_micro_batches(x, micro_batch, mesh=None):
    """(B, ...) -> (B // micro_batch, micro_batch, ...). speed: row b goes to micro-batch b % n, so
    each device's slice of the batch splits locally (no data moves between devices)."""
    n = x.shape[0] // micro_batch
    x = x.reshape(micro_batch, n, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, "data")))
    return x


def compute_grads(params, batch, cfg, mesh=None):
    """Mean loss and its gradient over the whole batch.

    speed:
    1. The embedding table of the step's distinct ids is built once (generator or lookup), and
       jax.vjp keeps what is needed to send its gradient back into the generator later.
    2. The body runs over micro-batches under lax.scan, accumulating gradients for the body
       parameters and for the (U, D) table.
    3. The accumulated table gradient goes through the generator's vjp once.
    So the generator costs one forward and one backward per step, however many micro-batches.
    """
    name = EMBEDDING_PARAMS[cfg.model]
    body = {key: value for key, value in params.items() if key != name}
    table, embed_vjp = jax.vjp(lambda p: embed({name: p}, batch["ids"], cfg), params[name])

    B = batch["inverse"].shape[0]
    micro = cfg.micro_batch or B
    if B % micro:
        raise ValueError(f"batch of {B} sequences does not split into micro-batches of {micro}")
    inverse = split_micro_batches(batch["inverse"], micro, mesh)  # (n, micro, T)
    targets = split_micro_batches(batch["targets"], micro, mesh)

    def micro_loss(body, table, inverse, targets):
        return table_losses(body, table, inverse, targets, cfg).mean()

    grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1))

    def accumulate(carry, xs):
        loss, (g_body, g_table) = grad_fn(body, table, *xs)
        return jax.tree_util.tree_map(jnp.add, carry, (loss, g_body, g_table)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, (jnp.zeros(()), body, table))
    (loss, g_body, g_table), _ = jax.lax.scan(accumulate, zeros, (inverse, targets))

    n = inverse.shape[0]
    (g_embed,) = embed_vjp(g_table / n)
    grads = {**jax.tree_util.tree_map(lambda g: g / n, g_body), name: g_embed}
    return loss / n, grads


def train_step(state, batch, cfg, mesh=None):
    """One optimizer step: gradients over the batch, clipping, AdamW. Returns (state, metrics)."""
    loss, grads = compute_grads(state["params"], batch, cfg, mesh)
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
             "step": state["step"] + 1}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": lr_schedule(cfg)(state["step"] - 1)}
    return state, metrics


@functools.lru_cache(maxsize=None)  # one compiled step per (cfg, mesh), however often it is asked for
def make_train_step(cfg, mesh=None):
    """The jitted train step: step(state, batch) -> (state, metrics), state buffers donated.

    With a mesh, the state is replicated and the batch (and its distinct ids, so the generator's
    work too) is split over the "data" axis; XLA inserts the gradient all-reduce."""
    fn = functools.partial(train_step, cfg=cfg, mesh=mesh)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(fn, donate_argnums=0, in_shardings=(replicated, split),
                   out_shardings=(replicated, replicated))


@functools.lru_cache(maxsize=None)
def make_eval_step(cfg, mesh=None):
    """Jitted eval(params, batch) -> per-token losses (B, T) in nats, on every device (and process)."""
    fn = functools.partial(token_losses, cfg=cfg)
    if mesh is None:
        return jax.jit(fn)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(fn, in_shardings=(replicated, split), out_shardings=replicated)


# ------------------------------------------------------------------------------------------------
# 9. The training loop
# ------------------------------------------------------------------------------------------------


def prefetch_to_device(batches, mesh=None, size=2):
    """Yield (batch on the device, info), `size` steps ahead (device_put is asynchronous). Items of
    `batches` are batch dicts or (batch, info) pairs. If `batches` raises, the batches it already
    gave are yielded first, then the error."""
    queue, error = collections.deque(), None
    try:
        for item in batches:
            batch, info = item if isinstance(item, tuple) else (item, None)
            queue.append((shard_batch(batch, mesh), info))
            if len(queue) > size:
                yield queue.popleft()
    except Exception as e:  # noqa: BLE001 -- re-raised below, after the loaded batches
        error = e
    while queue:
        yield queue.popleft()
    if error is not None:
        raise error


def print_every(n):
    """An on_step for train_loop that prints the loss at the first step and every n steps."""
    start = time.perf_counter()

    def on_step(step, metrics, state, info, todo):
        if step == 1 or step % n == 0:
            print(f"step {step:5d} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                  f"grad norm {metrics['grad_norm']:.3f} | {time.perf_counter() - start:.1f}s", flush=True)
    return on_step


def train_loop(state, batches, step_fn, steps, on_step, due=lambda step: (), needs_state=(), mesh=None):
    """Run up to `steps` optimizer steps on an iterator of host batches; returns the final state.

    batches: batch dicts (section 7), or (batch, info) pairs whose info is handed to on_step.
    due(step) says what the caller will do after a step (e.g. {"log", "checkpoint"}): asked once per
    step, as soon as it is dispatched, and handed over as on_step(step, metrics, state, info, todo),
    with metrics as Python floats (loss, lr, grad_norm). The device never waits for the host: a step's
    metrics are read only after the next step is dispatched, and state is then None (it has been handed
    on). Where todo meets `needs_state` (to evaluate, checkpoint or stop), at the last step, and before
    an error from `batches` propagates, the loop waits for that step and passes its state.
    """
    start = step = int(state["step"])
    unreported = None  # (step, metrics, info, todo) of a step dispatched but not yet handed to on_step

    def report(record, state):
        step, metrics, info, todo = record
        on_step(step, {k: float(v) for k, v in jax.device_get(metrics).items()}, state, info, todo)

    batches = prefetch_to_device(batches, mesh)
    while step < start + steps:
        try:
            batch, info = next(batches)
        except StopIteration:
            break
        except Exception:  # e.g. a shard that cannot be read: on_step may checkpoint first
            if unreported:
                report(unreported, state)
            raise
        state, metrics = step_fn(state, batch)  # dispatched: the device runs while the host goes on
        step += 1
        if unreported:
            report(unreported, None)  # the previous step, finished by now: no stall
        todo = set(due(step))
        unreported = (step, metrics, info, todo)
        if step == start + steps or todo & set(needs_state):
            report(unreported, state)  # waits for this step
            unreported = None
    if unreported:  # the batches ran out before `steps`
        report(unreported, state)
    return state


# ------------------------------------------------------------------------------------------------
# 10. Devices and speed accounting: the data-parallel mesh, model FLOPs, MFU
# ------------------------------------------------------------------------------------------------


def make_mesh(devices=None):
    """A 1-D mesh over all devices (of all hosts) with the axis "data" for data parallelism."""
    return Mesh(np.array(devices or jax.devices()), ("data",))


def put_global(x, sharding):
    """A host array that every process holds whole -> a global array with `sharding`: each process
    puts the parts its own devices hold (several processes: `train.py --distributed`)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(batch, mesh=None):
    """Put a host batch on the device(s), split along its first axis over the mesh's "data" axis."""
    if mesh is None:
        return jax.device_put(batch)
    split = NamedSharding(mesh, P("data"))
    return jax.tree_util.tree_map(lambda x: put_global(x, split), batch)


def flops_per_step(cfg, n_tokens, n_distinct):
    """Model FLOPs of one train step (forward + backward, no recomputation): 6 per parameter-token
    for the matrices the tokens pass through, 12 L T D per token for attention, and the generator's
    matrix work once per distinct id (3 knots of the mixing in sparse_head). Used for MFU."""
    D, L, F = cfg.d_model, cfg.n_layers, cfg.mlp_mult * cfg.d_model
    matmul_params = L * (4 * D * D + 3 * D * F) + D * cfg.vocab_size
    flops = 6 * matmul_params * n_tokens + 12 * L * cfg.seq_len * D * n_tokens
    if cfg.model == "leviathan":
        knots = 3 if uses_sparse_head(cfg) else cfg.gen_knots  # the spline mixing's knots per coordinate
        per_head = cfg.d_seed * cfg.d_seed + cfg.d_seed * knots * cfg.gen_rank + cfg.gen_rank * D
        flops += 6 * cfg.gen_heads * per_head * n_distinct
    return flops


# Dense bf16 peak TFLOP/s by device kind (vendor figures), for MFU; None where unknown (e.g. CPU).
PEAK_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "A10G": 125, "L40S": 362,
               "L4": 121, "RTX 4090": 165, "V100": 125, "TPU v4": 275, "TPU v5 lite": 197,
               "TPU v5e": 197, "TPU v5p": 459, "TPU v6": 918}


def peak_flops(device=None):
    """Peak FLOP/s of one device from PEAK_TFLOPS, or None if the device kind is not in the table."""
    kind = (device or jax.devices()[0]).device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


# ------------------------------------------------------------------------------------------------
# 11. A trained model: its parameter file, and sampling
# ------------------------------------------------------------------------------------------------


def save_params(path, params, cfg, **meta):
    """The parameters alone, for sampling and for your own code (train.py writes params.npz beside
    each checkpoint): one float32 array per parameter, named by its path in the params dict
    ("head", "layers/wq", "generator/codebooks", ...), and "meta", a JSON string holding "config"
    (every Config field) and the keyword arguments (train.py: "step", "tokenizer")."""
    flat = {"/".join(k.key for k in path_): np.asarray(x, np.float32)
            for path_, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}
    flat["meta"] = np.array(json.dumps({"config": dataclasses.asdict(cfg), **meta}))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # written whole, then renamed: `path` is never half-written
        np.savez(f, **flat)
    os.replace(tmp, path)


def load_params(path):
    """-> (params, cfg, meta) of a file written by save_params; no optimizer is built."""
    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        params = {}
        for name in f.files:
            if name != "meta":
                *parents, leaf = name.split("/")
                functools.reduce(lambda d, key: d.setdefault(key, {}), parents, params)[leaf] = f[name]
    cfg = Config(**meta.pop("config"))
    return jax.tree_util.tree_map(jnp.asarray, params), cfg, meta


@functools.partial(jax.jit, static_argnames=("cfg", "n_new", "top_k", "n_valid"))
def sample(params, cfg, prompt_ids, n_new, key, temperature=1.0, top_k=0, n_valid=None):
    """Continue prompt_ids (P,) by n_new tokens -> (n_new,) int32, one token at a time.

    Each new token is drawn from softmax(logits / temperature) over the top_k most likely ids (0: all
    of them); temperature 0 takes the argmax. Ids from n_valid on (the vocabulary's padding) are never
    drawn. The model sees at most the last cfg.seq_len tokens. Shapes are static: the tokens live in
    a fixed buffer and every step runs `forward` on a seq_len window of it (no KV cache: simple, and
    fast enough for these sizes). An empty prompt is refused: the model would condition on padding."""
    P, T = prompt_ids.shape[0], cfg.seq_len
    if P == 0:
        raise ValueError("the prompt is empty; give at least one token (the end-of-text token starts a new document)")
    buffer = jnp.zeros(max(P + n_new, T), jnp.int32).at[:P].set(prompt_ids)  # prompt, then new tokens

    def next_token(i, buffer):
        length = P + i  # tokens so far
        start = jnp.maximum(length - T, 0)  # the window: the last T tokens (later slots are unread)
        window = jax.lax.dynamic_slice(buffer, (start,), (T,))  # (T,)
        logits = forward(params, window[None], cfg)[0, length - 1 - start].astype(jnp.float32)  # (V,)
        if n_valid is not None:
            logits = jnp.where(jnp.arange(logits.shape[0]) < n_valid, logits, -jnp.inf)
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        drawn = jax.random.categorical(jax.random.fold_in(key, i), logits / jnp.maximum(temperature, 1e-30))
        return buffer.at[length].set(jnp.where(temperature > 0, drawn, jnp.argmax(logits)))

    buffer = jax.lax.fori_loop(0, n_new, next_token, buffer)
    return buffer[P:P + n_new]


# ------------------------------------------------------------------------------------------------
# 12. `python leviathan.py`: the size table, then a tiny Leviathan learning its own source code
# ------------------------------------------------------------------------------------------------


def size_table():
    """Markdown table of every preset, both models, counted from the code."""
    rows = ["| size | d_model | heads | dense layers | Leviathan layers | dense params | "
            "Leviathan params | generator params | generator share |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in SIZES.items():
        dense, lev = count_params(param_shapes(config(name, "dense"))), param_shapes(config(name))
        gen = count_params(lev["generator"])
        rows.append(f"| {name} | {s['d_model']} | {s['n_heads']} | {s['dense_layers']} | "
                    f"{s['leviathan_layers']} | {dense:,} | {count_params(lev):,} | {gen:,} | "
                    f"{gen / count_params(lev):.1%} |")
    return "\n".join(rows)


def demo(steps=150, batch_size=16, seq_len=64, seed=0):
    """Train a tiny Leviathan on this file's bytes with a byte-level tokenizer: the loss falls."""
    enc = byte_encoding()
    with open(__file__, encoding="utf-8") as f:
        data = np.array(enc.encode_ordinary(f.read()), dtype=np.int32)
    cfg = config("tiny", vocab_size=padded_vocab(enc), seq_len=seq_len, batch_size=batch_size,
                 lr=3e-3, warmup_steps=10, steps=steps)
    print(f"\ndemo: tiny Leviathan, byte vocabulary {cfg.vocab_size} -> base {cfg.base}, "
          f"{cfg.n_digits} x {cfg.base} = {cfg.n_digits * cfg.base} codebook rows, "
          f"{count_params(param_shapes(cfg)):,} parameters, {len(data):,} tokens of leviathan.py")
    rng = np.random.default_rng(seed)

    def batches():
        while True:
            starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
            yield prepare_batch(np.stack([data[s:s + seq_len + 1] for s in starts]))

    state = init_state(jax.random.key(seed), cfg)
    state = train_loop(state, batches(), make_train_step(cfg), steps, on_step=print_every(25))
    print(f"(a uniform guess over {cfg.vocab_size} tokens is ln V = {math.log(cfg.vocab_size):.2f} nats)")
    prompt = np.array(enc.encode_ordinary("def "), np.int32)
    new = sample(state["params"], cfg, prompt, 120, jax.random.key(seed), 0.8, top_k=20, n_valid=enc.n_vocab)
    print(f"\nwhat it writes after {steps} steps (temperature 0.8, top-k 20):\n"
          f"def {enc.decode(np.asarray(new).tolist())}")


if __name__ == "__main__":
    print(size_table())
    demo()
