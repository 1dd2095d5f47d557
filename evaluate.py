"""Evaluation: the loss on fixed validation tokens, in nats per token and bits per byte, and by how
often each token was seen in training.

A generator shares its parameters across ids, so it might help the ids that a table rarely updates.
To look, the loss is also split into token-frequency buckets, once by the target token (the output
side: the same dense head in both models) and once by the input token (the side the generator
changes). train.py logs every view at each evaluation; plot.py draws them.
"""

import math

import numpy as np

import leviathan as lv

N_BUCKETS = 5  # token-frequency buckets of the validation loss


def frequency_buckets(counts, n_buckets=N_BUCKETS):
    """Bucket of every vocabulary id by training frequency: counts (V,) -> (V,) ints in [0, n_buckets).

    Ids sorted by count (descending, ties by id) are cut into n_buckets runs of equal token mass: an
    id goes to bucket floor(n_buckets * (mass of the ids before it) / total mass). Bucket 0 holds the
    most frequent ids; the last holds the rarest and every id never seen. A very frequent id can leave
    the bucket after it empty."""
    counts = np.asarray(counts, np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count descending, then by id
    mass_before = np.cumsum(counts[order]) - counts[order]
    buckets = np.empty(len(counts), np.int64)
    buckets[order] = mass_before * n_buckets // max(int(counts.sum()), 1)
    buckets[counts == 0] = n_buckets - 1
    return buckets


def bucket_means(losses, which):
    """Mean loss and token count per bucket, `which` giving each token's bucket: (lists of N_BUCKETS)."""
    tokens = np.bincount(which, minlength=N_BUCKETS)
    sums = np.bincount(which, weights=losses, minlength=N_BUCKETS)
    return [float(s / n) if n else None for s, n in zip(sums, tokens)], [int(n) for n in tokens]


def loss_summary(losses, targets, buckets, n_bytes, inputs=None):
    """Per-token losses, their targets (and inputs) -> val_loss (nats/token), val_bpb and the loss per
    frequency bucket of the target token (val_bucket_*: the output side) and of the input token
    (val_input_bucket_*: the side the generator changes). Each view's token-weighted mean is val_loss."""
    losses, targets = np.asarray(losses, np.float64).ravel(), np.asarray(targets).ravel()
    summary = {"val_loss": float(losses.mean()),
               "val_bpb": float(losses.sum() / n_bytes / math.log(2)) if n_bytes else None}
    summary["val_bucket_loss"], summary["val_bucket_tokens"] = bucket_means(losses, buckets[targets])
    if inputs is not None:
        which = buckets[np.asarray(inputs).ravel()]
        summary["val_input_bucket_loss"], summary["val_input_bucket_tokens"] = bucket_means(losses, which)
    return summary


def validation_loss(eval_step, params, val, counts, mesh=None):
    """Loss on the fixed validation batches (data.load_validation), bucketed by the training token
    counts so far (data.Tally), by target token and by input token. eval_step: lv.make_eval_step."""
    batches = val["batches"]
    losses = np.concatenate([np.asarray(eval_step(params, lv.shard_batch(b, mesh))) for b in batches])  # (rows, T)
    targets = np.concatenate([b["targets"] for b in batches])
    inputs = np.concatenate([b["ids"][b["inverse"]] for b in batches])  # (rows, T)
    return loss_summary(losses, targets, frequency_buckets(counts), val["bytes"], inputs)
