"""Continual metrics against hand-computed accuracy matrices, and their state round trips."""

import math

import pytest
import torch

from continual.metrics import (AccuracyMatrix, PrequentialAccuracy, average_accuracy, backward_transfer,
                               forgetting, forgetting_avalanche, forgetting_per_experience, forward_transfer,
                               prequential_update)

# R[i, j]: accuracy on experience j after training through i. Accuracy on experience 0 rose after
# experience 1 was trained (0.9 -> 0.95), which is where the two forgetting definitions part.
R = [[0.90, 0.10, 0.20],
     [0.95, 0.80, 0.30],
     [0.60, 0.50, 0.95]]
B = [0.10, 0.05, 0.20]


def test_average_accuracy_is_the_final_row_mean():
    assert average_accuracy(R) == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    assert average_accuracy(R, after=1) == pytest.approx((0.95 + 0.80) / 2)
    assert average_accuracy(R, after=0) == pytest.approx(0.90)


def test_backward_transfer():
    assert backward_transfer(R) == pytest.approx(((0.60 - 0.90) + (0.50 - 0.80)) / 2)
    assert backward_transfer(R, after=1) == pytest.approx(0.95 - 0.90)
    assert backward_transfer(R, after=0) == 0.0


def test_forward_transfer_against_random_init():
    assert forward_transfer(R, B) == pytest.approx(((0.10 - 0.05) + (0.30 - 0.20)) / 2)
    assert forward_transfer(R, B, after=1) == pytest.approx(0.10 - 0.05)
    with pytest.raises(ValueError, match="one accuracy per experience"):
        forward_transfer(R, B[:2])


def test_forgetting_chaudhry_takes_the_best_earlier_accuracy():
    f = forgetting_per_experience(R)
    torch.testing.assert_close(f, torch.tensor([0.95 - 0.60, 0.80 - 0.50], dtype=torch.float64))
    assert forgetting(R) == pytest.approx(((0.95 - 0.60) + (0.80 - 0.50)) / 2)
    # after experience 1, accuracy on 0 is at its best: negative forgetting
    assert forgetting(R, after=1) == pytest.approx(0.90 - 0.95)
    assert forgetting(R, after=0) == 0.0


def test_forgetting_avalanche_uses_the_accuracy_right_after_training():
    assert forgetting_avalanche(R) == pytest.approx(((0.90 - 0.60) + (0.80 - 0.50)) / 2)
    assert forgetting_avalanche(R) < forgetting(R)


def test_chaudhry_max_runs_over_all_earlier_steps_including_before_training():
    # accuracy on experience 1 was higher before it was trained (0.85) than right after (0.80)
    R2 = [[0.9, 0.85], [0.7, 0.80]]
    assert forgetting_per_experience(R2, after=1).tolist() == pytest.approx([0.9 - 0.7])
    R3 = [[0.9, 0.85, 0.1], [0.9, 0.80, 0.1], [0.9, 0.50, 0.9]]
    assert forgetting_per_experience(R3).tolist() == pytest.approx([0.0, 0.85 - 0.50])


def test_unmeasured_entries_are_named_not_averaged():
    R4 = [[0.9, math.nan], [math.nan, 0.8]]
    with pytest.raises(ValueError, match="not measured"):
        average_accuracy(R4)
    # an unmeasured earlier entry is skipped in the max, an unmeasured final one is an error
    R5 = [[0.9, math.nan, math.nan], [math.nan, 0.8, math.nan], [0.5, 0.4, 0.9]]
    assert forgetting(R5) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.4)) / 2)
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError, match="after=3"):
        average_accuracy(R, after=3)


def test_accuracy_matrix_records_summarises_and_round_trips():
    history = AccuracyMatrix(3)
    for j, b in enumerate(B):
        history.record_random_init(j, b)
    history.record_row(0, R[0])
    for j, acc in enumerate(R[1]):
        history.record(1, j, acc)
    s1 = history.summary(after=1)
    assert s1["acc"] == pytest.approx(0.875) and s1["fwt"] == pytest.approx(0.05)
    history.record_row(2, R[2])
    assert history.summary() == pytest.approx({"acc": average_accuracy(R), "bwt": backward_transfer(R),
                                               "forgetting": forgetting(R), "fwt": forward_transfer(R, B),
                                               "forgetting_avalanche": forgetting_avalanche(R)})
    restored = AccuracyMatrix(3)
    restored.load_state_dict({k: v.clone() for k, v in history.state_dict().items()})
    assert torch.equal(restored.R, history.R) and torch.equal(restored.random_init, history.random_init)
    assert restored.summary() == history.summary()
    with pytest.raises(ValueError, match="this run has"):
        AccuracyMatrix(2).load_state_dict(history.state_dict())
    with pytest.raises(IndexError, match="experience=3"):
        history.record(0, 3, 0.5)


def test_summary_leaves_out_fwt_without_random_init():
    history = AccuracyMatrix(1)
    history.record(0, 0, 0.7)
    assert history.summary() == {"acc": 0.7, "bwt": 0.0, "forgetting": 0.0, "forgetting_avalanche": -0.0}


def test_prequential_accuracy_plain_and_fading():
    plain = PrequentialAccuracy()
    assert math.isnan(plain.accuracy)
    plain.update(torch.tensor([1, 0, 1]))
    plain.update(True)
    assert plain.accuracy == pytest.approx(0.75) and plain.seen == 4
    faded = PrequentialAccuracy(fading=0.5)
    faded.update([1, 0, 1, 1])
    # S: 1, 0.5, 1.25, 1.625;  N: 1, 1.5, 1.75, 1.875
    assert faded.accuracy == pytest.approx(1.625 / 1.875)
    assert prequential_update(1.25, 1.75, 1.0, 0.5) == (1.625, 1.875)
    with pytest.raises(ValueError, match="fading"):
        PrequentialAccuracy(fading=0.0)


def test_prequential_resumes_bitwise():
    stream = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.7
    a, b = PrequentialAccuracy(0.99), PrequentialAccuracy(0.99)
    a.update(stream[:120])
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    a.update(stream[120:])
    b.update(stream[120:])
    assert a.accuracy == b.accuracy and a.seen == b.seen == 200
