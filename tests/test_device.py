"""The reference step is device-agnostic: no CPU-only code for tensors on other devices, and the same
stochastic-rounding stream (keys, uniforms, bits) on every device.

What runs without a GPU: the CPU-only entry points (the C kernels through ctypes, the fused op) refuse tensors
that are not on CPU (checked with 'meta' tensors, which hold no data), the optimizers draw every key from one CPU
generator, and the reference step run with every C kernel switched off (what a CUDA tensor gets) gives the bits
of the normal CPU run. Where a CUDA GPU is present, the same steps on CUDA tensors are compared with CPU ones bit
for bit (``test_cpu_and_cuda_steps_give_the_same_bits``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim import kernels, rng
from ecoptim.optim import fused
from ecoptim.optim.state8 import State8bit, quantize_state
from ecoptim.qtensor import QuantizedTensor

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ADAMW = dict(lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1)
CASES = {
    "adamw": (ecoptim.AdamW, ADAMW),
    "adamw-bf16-states": (ecoptim.AdamW, dict(ADAMW, state_dtype=torch.bfloat16)),
    "adamw-8bit-sr-states": (ecoptim.AdamW, dict(ADAMW, state_dtype=State8bit(16, "stochastic"))),
    "sgd": (ecoptim.SGD, dict(lr=3e-2, momentum=0.9, weight_decay=0.01)),
}
ROW_E4M3 = ecoptim.QuantSpec(ecoptim.FP8_E4M3, ecoptim.PerRow())
FORMATS = [("fp8_e4m3", "row"), ("fp8_e5m2", "tensor"), ("int8", "group32"), ("int4", "row"), ("bf16", "none")]


def _model(fmt: str, gran: str) -> nn.Module:
    """Two quantized weights (two keys per step, drawn in parameter order), one with rows of very different
    magnitudes, and a dense bias (the plain update)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 12, bias=True), nn.Linear(32, 64, bias=False))  # never run forward
    with torch.no_grad():
        m[0].weight.mul_(torch.logspace(-3, 0, 12)[:, None])
    return ecoptim.quantize_(m, fmt, gran, filter_fn=lambda mod, n: isinstance(mod, nn.Linear))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """``steps`` optimizer steps with gradients drawn on CPU (the same values on every device)."""
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in model.parameters():
            grad = torch.randn(p.shape, generator=g) * (1e-3, 1e-1, 1e-5)[step % 3]
            p.grad = grad.to(p.device)
        opt.step()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every stored bit of the weights and the optimizer state, as CPU tensors."""
    out = {}
    for i, p in enumerate(model.parameters()):
        if isinstance(p, QuantizedTensor):
            out[f"{i}.codes"] = p.codes.view(torch.uint8).cpu() if p.codes.element_size() == 1 else p.codes.cpu()
            if p.scale is not None:
                out[f"{i}.scale"] = p.scale.cpu()
        else:
            out[f"{i}.dense"] = p.detach().cpu()
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                out[f"{i}.state.{k}"] = v.cpu()
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs {where}"


def _kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every C entry point as it is for a tensor off the CPU: not there. ``kernels.uniform`` and the fused op's
    runner (called directly, not through a gate) raise, so a call that slipped past its gate fails the test."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", True)

    def forbidden(*args, **kwargs):
        raise AssertionError("CPU-only C code called")

    monkeypatch.setattr(kernels, "uniform", forbidden)
    monkeypatch.setattr(fused, "run", forbidden)


# -- keys ------------------------------------------------------------------------------------------------------
def test_keys_come_from_one_cpu_generator_for_every_device():
    opt = ecoptim.AdamW([torch.zeros(2, requires_grad=True)], seed=7)
    g = opt.generator(torch.device("meta"))
    assert g is opt.generator(torch.device("cpu")) and g.device.type == rng.KEY_DEVICE == "cpu"
    if torch.cuda.is_available():
        assert opt.generator(torch.device("cuda")) is g
    assert rng.draw_keys(g, 2) == rng.draw_keys(torch.Generator().manual_seed(7), 2)
    assert set(opt.state_dict()["ecoptim"]["rng"]) == {"cpu"}


def test_uniforms_are_the_same_function_on_any_device():
    """``uniform_torch`` (what non-CPU tensors get) equals the C stream, and builds on the given device."""
    key = (0x12345678, 0x9ABCDEF0)
    assert torch.equal(rng.uniform_torch(key, 1000), rng.uniform(key, 1000))
    assert rng.uniform(key, 1000, "meta").device.type == "meta"


# -- no CPU-only code for other devices --------------------------------------------------------------------------
def test_cpu_only_entry_points_refuse_tensors_off_the_cpu(monkeypatch):
    meta = torch.empty(64, device="meta")
    assert kernels.all_finite([meta]) is None and kernels.sumsq([meta]) is None

    def forbidden(*args, **kwargs):
        raise AssertionError("CPU-only C code called for a meta tensor")

    monkeypatch.setattr(kernels, "load", forbidden)
    monkeypatch.setattr(kernels, "available", forbidden)
    monkeypatch.setattr(kernels, "uniform", forbidden)
    assert rng.uniform((1, 2), 64, meta.device).device.type == "meta"
    for rounding in ("nearest", "stochastic"):  # the 8-bit state codec's torch definition
        codes, absmax = quantize_state(meta, True, State8bit(16, rounding), key=(1, 2))
        assert codes.device.type == absmax.device.type == "meta"
    w = QuantizedTensor.from_float(torch.randn(4, 16), ROW_E4M3)
    p = nn.Parameter(QuantizedTensor(w.codes.to("meta"), w.scale.to("meta"), w.spec, w.shape, w.dtype))
    p.grad = torch.zeros(4, 16, device="meta")
    assert not fused.applies(p, p.spec, dict(fused=None, lr=1e-3, mode="eco"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt,gran", FORMATS)
@pytest.mark.parametrize("mode", ["eco", "kahan"])
def test_reference_step_without_any_cpu_kernel_gives_the_same_bits(monkeypatch, case, fmt, gran, mode):
    """The reference step with every C kernel off (the torch code a CUDA tensor runs) gives the bits of the
    normal CPU run, fused kernel included: the C code is only ever a faster way to the same numbers."""
    opt_cls, kw = CASES[case]
    kw = dict(kw, mode=mode, rounding="stochastic")
    a, b = _model(fmt, gran), _model(fmt, gran)
    o_a = opt_cls(a.parameters(), **kw)
    _steps(a, o_a)
    with monkeypatch.context() as m:
        _kernels_off(m)
        o_b = opt_cls(b.parameters(), fused=False, **kw)
        _steps(b, o_b)
    _assert_same(_snapshot(a, o_a), _snapshot(b, o_b), f"({case}, {fmt}/{gran}, {mode})")


# -- CPU and CUDA ------------------------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt,gran", FORMATS)
@pytest.mark.parametrize("mode", ["eco", "naive", "master", "exact", "kahan"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_cpu_and_cuda_steps_give_the_same_bits(case, fmt, gran, mode, rounding):
    """The same model, gradients and seed on CPU and on CUDA: identical codes, scales and states."""
    opt_cls, kw = CASES[case]
    kw = dict(kw, mode=mode, rounding=rounding)
    cpu = _model(fmt, gran)
    gpu = copy.deepcopy(cpu).to("cuda")
    o_cpu, o_gpu = opt_cls(cpu.parameters(), **kw), opt_cls(gpu.parameters(), **kw)
    _steps(cpu, o_cpu)
    _steps(gpu, o_gpu)
    _assert_same(_snapshot(cpu, o_cpu), _snapshot(gpu, o_gpu), f"({case}, {fmt}/{gran}, {mode}, {rounding})")
    assert o_cpu.generator(torch.device("cpu")).get_state().equal(o_gpu.generator(torch.device("cuda")).get_state())


@CUDA
def test_quantize_with_stochastic_rounding_gives_the_same_codes_on_cuda():
    w = torch.randn(64, 96)
    spec = ROW_E4M3
    a = QuantizedTensor.from_float(w, spec, "stochastic", torch.Generator().manual_seed(3))
    b = QuantizedTensor.from_float(w.cuda(), spec, "stochastic", torch.Generator().manual_seed(3))
    assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8).cpu()) and torch.equal(a.scale,
                                                                                                    b.scale.cpu())


# -- the app and the GPU check on CPU ------------------------------------------------------------------------------
def test_compare_device_flag(tmp_path, capsys):
    """``--device cpu`` is today's run (same results); a device torch cannot use is refused with a message."""
    import json

    from ecoptim.app.cli import main
    fast = ["compare", "--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--threads", "1", "--quiet", "--steps", "2", "--methods", "fp8_eco_sr"]
    assert main([*fast, "--out", str(tmp_path / "a")]) == 0
    assert main([*fast, "--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["results"][0]["final_val_loss"] == b["results"][0]["final_val_loss"]
    assert a["results"][0]["val_curve"] == b["results"][0]["val_curve"]
    bad = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(SystemExit):
            main([*fast, "--device", device, "--out", str(tmp_path / "c")])
        assert "argument --device" in capsys.readouterr().err


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """``benchmarks/gpu_check.py --device cpu --tiny`` runs every stage and writes its JSON and table."""
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    threads = torch.get_num_threads()
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path),
                         "--tests", "tests/test_device.py::test_uniforms_are_the_same_function_on_any_device"])
    assert torch.get_num_threads() == threads  # the suite's setting survives the benchmark inside
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and not result["errors"] and result["dry_run"], result["errors"]
    assert result["tests"]["counts"] == {"passed": 1}
    assert {t["target"] for t in result["targets"]} and all(t["value"] is not None for t in result["targets"])
    assert result["fp8_matmul"]["dequantize"]["held_bytes"] > result["fp8_matmul"]["fp8"]["held_bytes"]
    assert "# GPU check on cpu" in (tmp_path / "gpu_check.md").read_text()


def test_a_saved_generator_state_of_another_device_is_ignored_with_a_warning():
    """Keys come from the CPU generator only: a 'cuda:0' state (an older checkpoint of a CUDA run) is not loaded
    into a generator nothing reads (nor, without a GPU, into one that cannot be made); the CPU state is."""
    lin = torch.nn.Linear(8, 4)
    opt = ecoptim.AdamW(lin.parameters(), lr=1e-3)
    cpu_state = torch.Generator().manual_seed(7).get_state()
    with pytest.warns(RuntimeWarning, match="'cuda:0' ignored"):
        opt.set_rng_states({"cpu": cpu_state, "cuda:0": cpu_state.clone()})
    assert set(opt.rng_states()) == {"cpu"} and torch.equal(opt.rng_states()["cpu"], cpu_state)
