"""evaluate.py: frequency buckets and the validation loss by target and by input token."""

import numpy as np
import pytest

import evaluate


# --- evaluation by token frequency -------------------------------------------------------------------


def test_frequency_buckets_cut_sorted_ids_into_equal_token_mass():
    assert evaluate.frequency_buckets(np.ones(10, np.int64)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    #         id: 0   1   2   3   4  5  6  7  8   9   (sorted: 1, 9, 4, 2, 3, 6, 7, then the unseen)
    counts = np.array([0, 50, 10, 10, 30, 0, 5, 5, 0, 40])  # mass before each: 0, 50, 90, 120, ... of 150
    assert evaluate.frequency_buckets(counts).tolist() == [4, 0, 4, 4, 3, 4, 4, 4, 4, 1]  # bucket 2 empty
    assert evaluate.frequency_buckets(np.zeros(6, np.int64)).tolist() == [4] * 6  # nothing seen yet

    rng = np.random.default_rng(0)
    counts = rng.zipf(1.3, 5000) * (rng.random(5000) < 0.8)  # a long tail, a fifth never seen
    buckets = evaluate.frequency_buckets(counts)
    assert buckets.shape == (5000,) and set(np.unique(buckets)) <= set(range(5))  # a partition
    order = np.lexsort((np.arange(5000), -counts))
    assert np.all(np.diff(buckets[order]) >= 0)  # more frequent ids never in a rarer bucket
    assert np.all(buckets[counts == 0] == 4)
    mass = np.bincount(buckets, weights=counts, minlength=5) / counts.sum()
    assert np.all(mass[mass > 0] <= 0.2 + counts.max() / counts.sum())


def test_bucket_losses_average_to_the_validation_loss():
    rng = np.random.default_rng(1)
    targets, losses = rng.integers(0, 50, (6, 32)), rng.random((6, 32)) * 10
    buckets = evaluate.frequency_buckets(np.r_[rng.integers(1, 100, 40), np.zeros(10, int)])
    summary = evaluate.loss_summary(losses, targets, buckets, n_bytes=500)
    n, loss = np.array(summary["val_bucket_tokens"]), summary["val_bucket_loss"]
    assert n.sum() == targets.size
    weighted = sum(k * x for k, x in zip(n, loss) if x is not None) / n.sum()
    assert weighted == pytest.approx(summary["val_loss"], rel=1e-12)
    assert summary["val_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    assert summary["val_bpb"] == pytest.approx(losses.sum() / 500 / np.log(2), rel=1e-12)
    assert all((x is None) == (k == 0) for k, x in zip(n, loss))


def test_input_buckets_group_positions_by_the_input_token():
    counts = np.array([100, 50, 10, 5, 1, 0])  # ids 0 .. 5: bucket 0 holds id 0 (most frequent)
    buckets = evaluate.frequency_buckets(counts)
    inputs = np.array([[0, 0, 5, 3]])  # positions read ids 0, 0, 5 (unseen: the last bucket), 3
    targets = np.array([[5, 3, 0, 0]])
    losses = np.array([[1.0, 2.0, 7.0, 4.0]])
    summary = evaluate.loss_summary(losses, targets, buckets, n_bytes=4, inputs=inputs)
    assert summary["val_input_bucket_tokens"][0] == 2 and summary["val_input_bucket_loss"][0] == 1.5
    assert summary["val_input_bucket_tokens"][-1] == 1 + (buckets[3] == 4)
    assert summary["val_bucket_tokens"][0] == 2 and summary["val_bucket_loss"][0] == 5.5  # by target
    n, loss = summary["val_input_bucket_tokens"], summary["val_input_bucket_loss"]
    assert sum(k * x for k, x in zip(n, loss) if k) / sum(n) == pytest.approx(summary["val_loss"])
