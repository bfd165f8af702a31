import numpy as np
import pytest

from device_agents.inference import fidelity, top1_accuracy


def test_top1_accuracy_counts_argmax_hits():
    out = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert top1_accuracy(out, np.array([1, 0, 0, 0])) == pytest.approx(0.75)


def test_fidelity_agreement_and_errors():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = np.array([[0.9, 0.2], [0.6, 0.5]])
    f = fidelity(out, ref)
    assert f["top1_agreement"] == 0.5
    assert f["max_abs_error"] == pytest.approx(0.6)
    assert f["mean_abs_error"] == pytest.approx((0.1 + 0.2 + 0.6 + 0.5) / 4)
