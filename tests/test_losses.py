import math

import pytest
import torch
from torch import nn

from dfkd.hooks import BatchNormPrior
from dfkd.losses import js_divergence, kd_loss, l2_prior, tv_prior


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    T = 2.0
    ps = torch.softmax(s / T, 1)[0]
    pt = torch.softmax(t / T, 1)[0]
    expected = float((pt * (pt.log() - ps.log())).sum()) * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    # by hand: softmax([0.5, 0]) = [0.6225, 0.3775]
    a, b = math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)
    by_hand = (b * math.log(b / a) + a * math.log(a / b)) * 4
    assert kd_loss(s, t, T).item() == pytest.approx(by_hand, rel=1e-5)
    assert kd_loss(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_js_divergence_bounds():
    a = torch.tensor([[10.0, -10.0]])
    b = torch.tensor([[-10.0, 10.0]])
    assert js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert js_divergence(a, b).item() == pytest.approx(math.log(2), rel=1e-3)


def test_image_priors_hand_values():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 1] = 1.0  # [[0, 1], [0, 0]]
    # vertical diffs: |0-0|, |0-1| -> mean 0.5; horizontal: |1-0|, |0-0| -> mean 0.5
    assert tv_prior(x).item() == pytest.approx(1.0)
    # centred pixels: [-0.5, 0.5, -0.5, -0.5] -> norm 1.0
    assert l2_prior(x).item() == pytest.approx(1.0)


def test_batchnorm_prior_matches_hand_computation_and_removes_hooks():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    model = nn.Sequential(bn).eval()
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[1.0, 3.0]], [[2.0, 2.0]]]])  # (2, 2, 1, 2)
    # channel 0: values 1,3,1,3 -> mean 2, var 1; channel 1: 0,0,2,2 -> mean 1, var 1
    mean_term = math.sqrt((2 - 1) ** 2 + (1 - (-1)) ** 2)
    var_term = math.sqrt((1 - 2) ** 2 + (1 - 0.5) ** 2)
    with BatchNormPrior(model, first_weight=3.0) as prior:
        model(x)
        value = prior.loss().item()
        assert len(bn._forward_hooks) == 1
    assert value == pytest.approx(3.0 * (mean_term + var_term), rel=1e-5)
    assert len(bn._forward_hooks) == 0


def test_prior_hooks_removed_on_exception():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    with pytest.raises(ZeroDivisionError):
        with BatchNormPrior(model):
            1 / 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
