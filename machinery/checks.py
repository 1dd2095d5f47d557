"""Machinery a learner may skip: what train.py checks and says before a run starts, so that a
flag the machine cannot serve ends in one sentence and a slow run says so at once."""

import jax
import jax.numpy as jnp

import leviathan as lv
from machinery.cli import BadFlag

CPU_FLOPS = 30e9  # FLOP/s of a train step on this project's 2-core CPU (tiny and 60M, README: Performance)


def attention(cfg):
    """--attention cudnn where this machine has no cuDNN kernel: one sentence, before any work."""
    if cfg.attention == "xla":
        return
    q = jnp.zeros((1, 8, 1, 16), jnp.bfloat16)  # (B, T, N, hd)
    try:
        jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation=cfg.attention).block_until_ready()
    except Exception as e:  # noqa: BLE001 -- whatever the backend says, the kernel is not here
        raise BadFlag(f"--attention {cfg.attention} is not available on this {jax.default_backend()} machine "
                      f"({str(e).splitlines()[0][:80]}); it needs an NVIDIA GPU with cuDNN: use --attention xla")


def notes(cfg, n_devices):
    """One-line notes printed at the start: what a step costs on a CPU, a generator larger than its table."""
    notes = []
    if jax.default_backend() == "cpu":
        tokens = cfg.batch_size * cfg.seq_len
        seconds = lv.flops_per_step(cfg, tokens, min(tokens, cfg.vocab_size)) / (CPU_FLOPS * n_devices)
        tier = ("; a CPU fits the CPU tier: --size tiny --batch-size 16 --seq-len 128 (README)"
                if seconds > 60 else "")
        notes.append(f"no accelerator found: JAX runs on the CPU, where a step of {cfg.batch_size} x {cfg.seq_len} "
                     f"tokens takes about {duration(seconds) if seconds >= 60 else f'{seconds:.1f} s'} "
                     f"(estimated at {CPU_FLOPS / 1e9:g} GFLOP/s){tier}")
    if cfg.model == "leviathan":
        generator = lv.count_params(lv.param_shapes(cfg)["generator"])
        if generator > cfg.vocab_size * cfg.d_model:
            notes.append(f"note: this generator has {generator:,} parameters, more than the "
                         f"{cfg.vocab_size * cfg.d_model:,} of the table it replaces")
    return notes


def duration(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
