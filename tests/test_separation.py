"""Tests of nucjax.separation against hand-made label images and hand-counted answers."""

import math

import numpy as np
import pytest

from nucjax import separation


def test_touching_pairs_counts_side_and_both_diagonal_contacts_only():
    labels = np.zeros((6, 8), np.int32)
    labels[0:2, 0:2] = 1
    labels[0:2, 2:4] = 2  # side contact with 1
    labels[2, 4] = 3  # down-right corner of 2
    labels[0, 7] = 4
    labels[1, 6] = 5  # down-left corner of 4
    labels[4:6, 0:2] = 6
    labels[4:6, 3:5] = 7  # one empty column away from 6: not touching
    pairs = separation.touching_pairs(labels)
    np.testing.assert_array_equal(pairs, [[1, 2], [2, 3], [4, 5]])
    np.testing.assert_array_equal(separation.touching_ids(labels), [1, 2, 3, 4, 5])


def test_touching_pairs_of_an_image_without_contacts_is_empty():
    labels = np.zeros((5, 5), np.int32)
    labels[0, 0], labels[4, 4] = 1, 2
    assert separation.touching_pairs(labels).shape == (0, 2)
    assert separation.image_separation(labels, labels).score is None


def _scene():
    """gt: 1 (4 px) touches 2 (6 px) by a side, 2 touches 3 (4 px) at a corner, 4 alone.
    pred: A = 1 ∪ 2 (a merge), B = 3 exactly, C = 4 exactly, D = a false positive on background."""
    gt = np.zeros((10, 10), np.int32)
    gt[0:2, 0:2] = 1
    gt[0:2, 2:5] = 2
    gt[2:4, 5:7] = 3
    gt[7:9, 0:2] = 4
    pred = np.zeros_like(gt)
    pred[0:2, 0:5] = 11
    pred[2:4, 5:7] = 12
    pred[7:9, 0:2] = 13
    pred[7:9, 7:9] = 14
    return gt, pred


def test_restricted_metrics_and_merges_of_a_hand_made_scene():
    gt, pred = _scene()
    s = separation.image_separation(gt, pred, thresholds=(0.5, 0.75))
    assert (s.n_touching, s.n_pairs, s.merged_pairs) == (3, 2, 1)  # (1, 2) merged by A; (2, 3) not
    # Touching predictions: A (assigned to 2, its larger overlap) and B; C belongs to isolated 4, D to nothing.
    # IoU(A, 2) = 6/10, IoU(B, 3) = 1. At 0.5: TP = {2, 3}, FN = {1}, FP = {}. At 0.75: TP = {3}, FN = {1, 2}, FP = {A}.
    assert s.tp == (2, 1) and s.fn == (1, 2) and s.fp == (0, 1)
    # Restricted DSB2018 score (IoU > t): 2/3 at t = 0.5, 0.55; 1/4 at t = 0.6 ... 0.95 (A's IoU 0.6 is not > 0.6).
    assert s.score == pytest.approx((2 * 2 / 3 + 8 * 1 / 4) / 10)
    summary = separation.summarize([s])
    assert summary["touching_recall@0.5"] == pytest.approx(2 / 3)
    assert summary["touching_accuracy@0.5"] == pytest.approx(2 / 3)
    assert summary["touching_accuracy@0.75"] == pytest.approx(1 / 4)
    assert summary["touching_f1@0.75"] == pytest.approx(2 / (2 + 1 + 2))
    assert summary["merges_per_100_pairs"] == pytest.approx(50.0)


def test_a_pair_is_merged_only_when_one_prediction_holds_more_than_half_of_each():
    gt = np.zeros((4, 8), np.int32)
    gt[0:2, 0:2] = 1
    gt[0:2, 2:4] = 2
    half = np.zeros_like(gt)
    half[0:2, 0:3] = 1  # all of 1, exactly half of 2
    more = half.copy()
    more[0, 3] = 1  # all of 1, three quarters of 2
    assert separation.image_separation(gt, half).merged_pairs == 0
    assert separation.image_separation(gt, more).merged_pairs == 1
    assert separation.image_separation(gt, gt).merged_pairs == 0


def test_summarize_pools_counts_over_images_and_skips_images_without_touching_nuclei_in_the_score():
    gt, pred = _scene()
    lonely = np.zeros((5, 5), np.int32)
    lonely[1:3, 1:3] = 1
    stats = [separation.image_separation(gt, pred), separation.image_separation(gt, gt),
             separation.image_separation(lonely, lonely)]
    summary = separation.summarize(stats)
    assert summary["touching_pairs"] == 4 and summary["merged_pairs"] == 1 and summary["touching_nuclei"] == 6
    assert summary["merges_per_100_pairs"] == pytest.approx(25.0)
    assert summary["touching_recall@0.5"] == pytest.approx(5 / 6)
    assert summary["touching_dsb2018_score"] == pytest.approx(((2 * 2 / 3 + 8 / 4) / 10 + 1.0) / 2)
    empty = separation.summarize([separation.image_separation(lonely, lonely)])
    assert math.isnan(empty["merges_per_100_pairs"]) and math.isnan(empty["touching_accuracy@0.5"])


def test_bad_input_raises_value_errors_naming_the_problem():
    gt, pred = _scene()
    with pytest.raises(ValueError, match="shape"):
        separation.image_separation(gt, pred[:5])
    with pytest.raises(ValueError, match="prediction must be a 2-D integer"):
        separation.image_separation(gt, pred > 0)
    with pytest.raises(ValueError, match="negative"):
        separation.touching_pairs(-gt)
    with pytest.raises(ValueError, match="at least one image"):
        separation.summarize([])
