"""The compiled fast path against the reference path (same grads fed to both, several steps)."""
import copy

import pytest
import torch

import ecoptim
from ecoptim.optim import fused
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, lm_loss


@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "row"), ("int8", "group32")])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["eco", "naive"])
def test_fused_adamw_agrees_with_reference(fmt, gran, rounding, mode):
    """Each step starts both paths from the same weights, moments and RNG state (the reference's), so a
    difference cannot compound through the error feedback; it is compared after every step."""
    torch.manual_seed(0)
    base = ecoptim.quantize_(TinyLM(d=64), fmt, gran)
    ref, fast = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1, mode=mode, rounding=rounding, seed=5)
    o_ref, o_fast = ecoptim.AdamW(ref.parameters(), **kw), ecoptim.AdamW(fast.parameters(), fused=True, **kw)
    g = torch.Generator().manual_seed(1)
    n_diff = n = 0
    for step in range(6):
        if step:  # restart the fast path from the reference's state
            fast.load_state_dict(ref.state_dict())
            o_fast.load_state_dict(copy.deepcopy(o_ref.state_dict()))  # deep: torch would alias the tensors
            o_fast.param_groups[0]["fused"] = True  # the loaded group carries the reference's fused=False
        idx = torch.randint(0, 64, (4, 17), generator=g)
        o_ref.zero_grad()
        lm_loss(ref, idx).backward()
        for a, b in zip(ref.parameters(), fast.parameters()):  # identical gradients for both paths
            b.grad = a.grad.clone()
        o_ref.step()
        o_fast.step()
        assert not fused._failed, "the compiled kernel must run here (gcc is part of the machine)"
        for a, b in zip(ref.parameters(), fast.parameters()):
            if not isinstance(a, QuantizedTensor):
                assert torch.equal(a, b)  # dense params take the same reference update
                continue
            # codes: equal except where an ulp-level difference in m/v moved a value across a rounding point;
            # a scale may differ in its last bit (the row absmax is computed from w_til)
            differ = a.codes.view(torch.uint8) != b.codes.view(torch.uint8)
            n_diff += int(differ.sum())
            n += a.numel()
            torch.testing.assert_close(b.scale, a.scale, rtol=1e-6, atol=0)
            same = ~differ.reshape(a.shape)  # where a code differs, so does the injected error: skip those
            for k in ("exp_avg", "exp_avg_sq"):
                ra, rb = o_ref.state[a][k], o_fast.state[b][k]
                assert ((ra - rb).abs()[same]).max() <= 1e-5 * ra.abs().max()
    assert n_diff <= 1e-4 * n
