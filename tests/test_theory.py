"""The reference's closed forms on f(x) = (L/2) x^2 with a noisy quantizer q(x) = x + N(0, sigma^2).

Stationary E[grad^2] (SGD with EMA momentum beta, lr):
    master weights   ~ L^2 sigma^2
    naive            ~ L sigma^2 / (2 lr)                       (grows without bound as lr -> 0)
    ECO              = 2 L^2 sigma^2 / (2 (1 - beta^2) - L lr (1 - beta)^2)   (bounded as lr -> 0)
Each of N independent coordinates is one copy of the 1-D problem; the real ecoptim.SGD drives them.
"""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim.formats import Format

L, SIGMA, BETA = 1.0, 0.01, 0.9


@dataclass(frozen=True)
class NoisyQuantizer(Format):
    """q(y) = y + sigma * N(0, 1): the theory's zero-mean error of variance sigma^2, independent of y."""

    sigma: float
    name: str = "noisy"
    bits: int = 32
    max: float = 3e38
    default_scaled: bool = False

    def round(self, y, rounding="nearest", generator=None):
        return y + self.sigma * torch.randn(y.shape, generator=generator)

    def encode(self, q):
        return q.clone()

    def decode(self, codes, numel):
        return codes.to(torch.float32, copy=True)


def stationary_grad_sq(mode: str, lr: float, n: int = 5000, steps: int = 2500, window: int = 1000) -> float:
    lin = nn.Linear(n, 1, bias=False)
    nn.init.zeros_(lin.weight)
    ecoptim.quantize_(lin, NoisyQuantizer(SIGMA), filter_fn=lambda m, name: True, storage="fake")
    w = lin.weight
    opt = ecoptim.SGD([w], lr=lr, momentum=BETA, dampening=BETA, mode=mode, rounding="stochastic", seed=0)
    acc = 0.0
    for t in range(steps):
        w.grad = L * w.detach().clone()  # gradient of (L/2) x^2 at the stored weight
        if t >= steps - window:
            acc += w.grad.pow(2).mean().item()
        opt.step()
    return acc / window


@pytest.fixture(scope="module")
def measured():
    return {(m, lr): stationary_grad_sq(m, lr) for m in ("master", "naive", "eco") for lr in (0.01, 0.0025)}


def test_master_weights_floor_is_L2_sigma2(measured):
    for lr in (0.01, 0.0025):
        assert measured["master", lr] == pytest.approx(L * L * SIGMA ** 2, rel=0.05)


def test_eco_matches_its_closed_form_and_stays_bounded(measured):
    for lr in (0.01, 0.0025):
        closed = 2 * L * L * SIGMA ** 2 / (2 * (1 - BETA ** 2) - L * lr * (1 - BETA) ** 2)
        assert measured["eco", lr] == pytest.approx(closed, rel=0.05)
    assert measured["eco", 0.0025] / measured["eco", 0.01] == pytest.approx(1.0, abs=0.05)


def test_naive_floor_grows_like_one_over_lr(measured):
    for lr in (0.01, 0.0025):
        assert measured["naive", lr] == pytest.approx(L * SIGMA ** 2 / (2 * lr), rel=0.15)
    ratio = measured["naive", 0.0025] / measured["naive", 0.01]
    assert 3.2 < ratio < 4.5  # lr shrank 4x
    assert measured["naive", 0.0025] > 20 * measured["eco", 0.0025]
