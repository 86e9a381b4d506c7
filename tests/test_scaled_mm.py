"""The FP8 matmul path of FP8 weights (``ecoptim.qtensor.fp8_linear``): ``torch._scaled_mm`` on the weight's FP8
codes, no dense weight, within the stated tolerance of the dequantize path. ``torch._scaled_mm`` runs on CPU
float8 tensors too, so the path is forced on CPU here (``fp8_matmul(True)``); on a GPU of compute capability
>= 8.9 it is the default."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim import qtensor
from ecoptim.qtensor import FP8_MATMUL_ENV, QuantizedTensor, fp8_matmul, fp8_matmul_applies

SPECS = [("fp8_e4m3", "row"), ("fp8_e4m3", "tensor"), ("fp8_e5m2", "row"), ("fp8_e5m2", "tensor")]


def _linear(fmt: str, gran: str, k: int = 96, n: int = 48, bias: bool = True,
            dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 0, n)[:, None])  # rows of very different magnitudes
    lin = lin.to(dtype)
    return ecoptim.quantize_(nn.Sequential(lin), fmt, gran, filter_fn=lambda m, name: isinstance(m, nn.Linear))[0]


def _forward_backward(lin: nn.Linear, x: torch.Tensor, dy: torch.Tensor, enabled: bool):
    x = x.detach().requires_grad_(True)
    lin.zero_grad()
    with fp8_matmul(enabled):
        y = lin(x)
        y.backward(dy)
    return y.detach(), x.grad, lin.weight.grad, None if lin.bias is None else lin.bias.grad


def _e4m3_bound(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The largest error row-wise E4M3 quantization of ``a`` can cause in ``a @ w.T``: per element of ``a`` half a
    step of E4M3, 2^-4 relative for normal values and 2^-10 * scale absolute for subnormal ones."""
    scale = a.abs().amax(dim=1, keepdim=True) / 448.0
    return 2.0 ** -4 * (a.abs() @ w.abs().T) + 2.0 ** -10 * scale * w.abs().sum(dim=1)[None, :]


FP8_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                             reason="needs a GPU with FP8 matmuls (compute capability >= 8.9)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=FP8_GPU)])
@pytest.mark.parametrize("fmt,gran", SPECS)
def test_fp8_linear_agrees_with_the_dequantize_path_within_the_stated_bound(fmt, gran, device):
    """Forward and input gradient: the error of E4M3 activations (gradients) plus the bf16 rounding of
    ``_scaled_mm``'s output, element by element; the relative Frobenius error is under 5% (about 2.6% measured).
    The weight and bias gradients are the dense path's maths."""
    lin = _linear(fmt, gran).to(device)
    g = torch.Generator().manual_seed(1)
    rows = torch.logspace(-3, 1, 24)[None, :, None]  # token rows of very different sizes
    x = (torch.randn(2, 24, 96, generator=g) * rows).to(device)
    dy = torch.randn(2, 24, 48, generator=g).to(device)
    y0, dx0, dw0, db0 = _forward_backward(lin, x, dy, False)
    y1, dx1, dw1, db1 = _forward_backward(lin, x, dy, True)
    w = lin.weight.dequantize(torch.float32)
    slack = 2.0 ** -8  # bf16 output of the row-wise _scaled_mm, plus the fp32 sums' rounding
    bound_y = _e4m3_bound(x.reshape(-1, 96), w).reshape(y0.shape) + slack * y0.abs() + 1e-6
    assert ((y1 - y0).abs() <= bound_y).all()
    # the input gradient multiplies the E4M3 row-quantized dy * s_w with the codes
    codes = lin.weight.codes.view(48, 96).to(torch.float32)
    s_w = lin.weight.spec.scale.decode(lin.weight.scale).reshape(1, -1).expand(1, 48).to(device)
    bound_dx = _e4m3_bound(dy.reshape(-1, 48) * s_w, codes.T).reshape(dx0.shape) + slack * dx0.abs() + 1e-6
    assert ((dx1 - dx0).abs() <= bound_dx).all()
    for a, b in ((y1, y0), (dx1, dx0)):
        assert float((a - b).norm() / b.norm()) < 0.05
    torch.testing.assert_close(dw1, dw0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db1, db0, rtol=1e-5, atol=1e-6)
    assert y1.dtype == dx1.dtype == dw1.dtype == torch.float32 and type(dw1) is torch.Tensor


def test_bf16_compute_dtype():
    lin = _linear("fp8_e4m3", "row", dtype=torch.bfloat16)
    x = torch.randn(8, 96, dtype=torch.bfloat16)
    dy = torch.randn(8, 48, dtype=torch.bfloat16)
    y0, dx0, *_ = _forward_backward(lin, x, dy, False)
    y1, dx1, *_ = _forward_backward(lin, x, dy, True)
    assert y1.dtype == dx1.dtype == torch.bfloat16
    for a, b in ((y1, y0), (dx1, dx0)):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 0.05


def test_no_dense_weight_is_materialised(monkeypatch):
    """Forward and backward run on the codes: dequantizing the weight (what the dispatch path does) fails the
    test, and ``_scaled_mm`` is called once each way."""
    lin = _linear("fp8_e4m3", "row")
    calls = []
    scaled_mm = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return scaled_mm(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("the weight was dequantized")

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    monkeypatch.setattr(QuantizedTensor, "dequantize", forbidden)
    x = torch.randn(5, 96, requires_grad=True)
    with fp8_matmul(True):
        lin(x).sum().backward()
    assert len(calls) == 2 and x.grad is not None and lin.weight.grad.shape == (48, 96)


def test_off_by_default_on_cpu_and_switches(monkeypatch):
    lin = _linear("fp8_e4m3", "row")
    x = torch.randn(4, 96)
    monkeypatch.delenv(FP8_MATMUL_ENV, raising=False)
    assert not fp8_matmul_applies(x, lin.weight, lin.bias)
    dense = nn.functional.linear(x, lin.weight.dequantize(), lin.bias)
    assert torch.equal(lin(x), dense)  # today's path, bit for bit
    with fp8_matmul(True):
        assert fp8_matmul_applies(x, lin.weight, lin.bias)
        with fp8_matmul(False):
            assert not fp8_matmul_applies(x, lin.weight, lin.bias)
        with fp8_matmul(None):
            assert not fp8_matmul_applies(x, lin.weight, lin.bias)
    monkeypatch.setenv(FP8_MATMUL_ENV, "1")
    assert fp8_matmul_applies(x, lin.weight, lin.bias)
    monkeypatch.setenv(FP8_MATMUL_ENV, "0")
    assert not fp8_matmul_applies(x, lin.weight, lin.bias)
    monkeypatch.setenv(FP8_MATMUL_ENV, "sometimes")
    with pytest.raises(ValueError, match=FP8_MATMUL_ENV):
        fp8_matmul_applies(x, lin.weight, lin.bias)
    with pytest.raises(ValueError, match="True, False or None"):
        with fp8_matmul("yes"):
            pass


@pytest.mark.parametrize("fmt,gran,k,n", [("int8", "row", 96, 48), ("fp8_e4m3", "group32", 96, 48),
                                          ("fp8_e4m3", "row", 90, 48), ("fp8_e4m3", "row", 96, 40),
                                          ("fp8_e5m2", "row", 96, 48),  # 3 tokens: not a multiple of 16
                                          ("bf16", "none", 96, 48)])
def test_other_weights_keep_the_dequantize_path(fmt, gran, k, n):
    """Not FP8, other granularities, or matmul dims that are not multiples of 16: the dispatch path, unchanged."""
    lin = _linear(fmt, gran, k=k, n=n)
    x = torch.randn(3, k)
    with fp8_matmul(True):
        assert not fp8_matmul_applies(x, lin.weight, lin.bias)
        assert torch.equal(lin(x), nn.functional.linear(x, lin.weight.dequantize(), lin.bias))


def test_a_model_trains_with_fp8_matmuls():
    """A few AdamW steps of a quantized MLP with the FP8 path: finite, decreasing loss, weights stay quantized."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    model = ecoptim.quantize_(model, "fp8_e4m3", "row", filter_fn=lambda m, name: isinstance(m, nn.Linear))
    opt = ecoptim.AdamW(model.parameters(), lr=1e-2)
    x, t = torch.randn(64, 32), torch.randn(64, 16)
    losses = []
    with fp8_matmul(True):
        for _ in range(20):
            loss = nn.functional.mse_loss(model(x), t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.9 * losses[0]
    assert isinstance(model[0].weight, QuantizedTensor)


def _gpu_check():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_fp8_path_holds_no_dense_weight_between_forward_and_backward():
    """Measured with torch's profiler (allocator events): the dequantize path keeps the dense weight (saved for
    the input gradient) from forward to backward, the FP8 path does not (``benchmarks/gpu_check.py``'s
    measurement, at a small shape)."""
    out = _gpu_check().linear_memory("cpu", n=256, k=256, tokens=64)
    dense_weight = 256 * 256 * 4
    assert out["dequantize"]["held_bytes"] - out["fp8"]["held_bytes"] >= dense_weight
    assert out["fp8"]["peak_bytes"] < out["dequantize"]["peak_bytes"]


def test_fp8_path_is_the_default_only_on_fp8_tensor_core_gpus():
    if torch.cuda.is_available():
        want = torch.cuda.get_device_capability() >= (8, 9)
        lin = _linear("fp8_e4m3", "row").cuda()
        assert fp8_matmul_applies(torch.randn(4, 96, device="cuda"), lin.weight, lin.bias) == want
    else:
        assert not qtensor.fp8_matmul_applies(torch.randn(4, 96), _linear("fp8_e4m3", "row").weight)


def test_under_autocast_the_output_has_autocasts_dtype():
    """Under bf16 autocast (an fp32 weight, bf16 activations from the layer before): the FP8 path applies, returns
    bf16 like F.linear under autocast, within the tolerance, and the gradients keep their inputs' dtypes."""
    lin = _linear("fp8_e4m3", "row")
    x = torch.randn(32, 96, dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for enabled in (False, True):
        x.grad = None
        lin.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), fp8_matmul(enabled):
            assert fp8_matmul_applies(x, lin.weight, lin.bias) == enabled
            y = lin(x)
        y.float().square().sum().backward()
        outs.append((y.detach().float(), x.grad.float(), lin.weight.grad, lin.bias.grad))
        assert y.dtype == x.grad.dtype == torch.bfloat16
        assert lin.weight.grad.dtype == lin.bias.grad.dtype == torch.float32
    for a, b in zip(outs[1], outs[0]):
        assert float((a - b).norm() / b.norm()) < 0.05  # about 3.3% at most: dy = 2y carries y's error on


def test_an_empty_batch_keeps_the_dequantize_path():
    lin = _linear("fp8_e4m3", "row")
    with fp8_matmul(True):
        assert not fp8_matmul_applies(torch.randn(0, 96), lin.weight, lin.bias)
        assert lin(torch.randn(0, 96)).shape == (0, 48)


def test_torch_compile_traces_the_fp8_path():
    """torch.compile (full graph) runs the same FP8 matmuls as eager: the same bits, forward and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16))
    model = ecoptim.quantize_(model, "fp8_e4m3", "row", filter_fn=lambda m, name: isinstance(m, nn.Linear))
    x = torch.randn(16, 64, requires_grad=True)
    got = []
    with fp8_matmul(True):
        for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
            x.grad = None
            model.zero_grad()
            y = fn(x)
            y.square().sum().backward()
            got.append((y.detach(), x.grad, model[0].weight.grad))
    with fp8_matmul(False):
        dense = model(x).detach()
    assert not torch.equal(got[0][0], dense)  # the FP8 path was taken
    for a, b in zip(*got):
        assert torch.equal(a, b)
