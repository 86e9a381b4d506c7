"""Quantized storage: QuantizedTensor, quantize_, memory_report, state_dict."""
import copy
import io

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim import formats as F
from ecoptim.codec import dequantize, quantize
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, lm_loss

SPECS = [("fp8_e4m3", "row"), ("fp8_e5m2", "group32"), ("int8", "row"), ("int4", "tensor"), ("int4", "group64"),
         ("bf16", None), ("fp16", None), ("fp8_e4m3", "tensor")]


@pytest.mark.parametrize("fmt,gran", SPECS)
def test_codes_are_on_grid_and_requantizing_w_hat_is_exact(fmt, gran):
    spec = F.QuantSpec.make(fmt, gran)
    w = torch.randn(48, 128) * 0.05
    codes, scale = quantize(w, spec)
    w_hat = dequantize(codes, scale, spec, w.shape)
    # with the scale held, quantizing a dequantized weight gives back the same codes, bit for bit
    codes2, _ = quantize(w_hat, spec, scale=scale)
    assert torch.equal(codes.view(torch.uint8) if codes.dtype.itemsize == 1 else codes, codes2.view(torch.uint8)
                       if codes2.dtype.itemsize == 1 else codes2)
    # the grid values are within half a spacing of w, and the absmax element maps to the format max
    err = (w - w_hat).abs()
    if scale is not None:
        nb, bs = spec.granularity.blocks(w.shape)
        y = (w.reshape(nb, bs) / scale[:, None])
        assert torch.allclose(y.abs().amax(1), torch.full((nb,), spec.format.max), rtol=1e-6)
        assert (err.reshape(nb, bs) <= 0.5 * spec.format.spacing(y.abs()) * scale[:, None] * (1 + 1e-6)).all()


@pytest.mark.parametrize("fmt,gran", SPECS)
def test_fake_and_real_forward_are_bit_identical(fmt, gran):
    torch.manual_seed(0)
    gran = "group16" if gran and gran.startswith("group") else gran  # TinyLM rows are 32 or 64 long
    base = TinyLM()
    real = ecoptim.quantize_(copy.deepcopy(base), fmt, gran, storage="real")
    fake = ecoptim.quantize_(copy.deepcopy(base), fmt, gran, storage="fake")
    idx = torch.randint(0, 64, (3, 17))
    assert torch.equal(real(idx), fake(idx))
    assert isinstance(real.blocks[0].qkv.weight, QuantizedTensor)
    assert torch.equal(real.blocks[0].qkv.weight.dequantize(), fake.blocks[0].qkv.weight)


def test_default_filter_skips_head_and_embedding():
    m = ecoptim.quantize_(TinyLM(), "fp8")
    quantized = {n for n, p in m.named_parameters() if isinstance(p, QuantizedTensor)}
    assert quantized == {f"blocks.{i}.{k}.weight" for i in range(2) for k in ("qkv", "proj", "up", "down")}
    assert not isinstance(m.lm_head.weight, QuantizedTensor) and not isinstance(m.emb.weight, QuantizedTensor)


def test_quantized_block_trains_end_to_end_through_autograd():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    idx = torch.randint(0, 64, (8, 33))
    losses = []
    for _ in range(40):
        loss = lm_loss(m, idx)
        opt.zero_grad()
        loss.backward()
        w = m.blocks[0].up.weight
        assert type(w.grad) is torch.Tensor and w.grad.shape == w.shape and w.grad.dtype == torch.float32
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert m.blocks[0].up.weight.codes.dtype == torch.float8_e4m3fn


def test_bf16_compute_dtype_gives_bf16_grads():
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    ecoptim.quantize_(lin, "fp8", filter_fn=lambda m, n: isinstance(m, nn.Linear))
    out = lin(torch.randn(4, 16, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt,gran,per_weight,per_scale", [
    ("fp8_e4m3", "row", 1.0, 4 / 256), ("int4", "group64", 0.5, 4 / 64), ("int4", "tensor", 0.5, 4 / (64 * 256)),
    ("int8", "group128", 1.0, 4 / 128), ("bf16", None, 2.0, 0.0)])
def test_measured_bytes_match_the_format(fmt, gran, per_weight, per_scale):
    m = nn.Sequential(nn.Linear(256, 64, bias=False), nn.Linear(256, 64, bias=False))
    ecoptim.quantize_(m, fmt, gran, filter_fn=lambda mod, n: isinstance(mod, nn.Linear))
    r = ecoptim.memory_report(m)
    n = 2 * 64 * 256
    assert r.numel == n
    assert r.weight_bytes == n * per_weight
    assert r.scale_bytes == pytest.approx(n * per_scale)


def test_memory_report_counts_shared_storage_once_and_optimizer_state():
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied
    m = nn.ModuleDict({"emb": emb, "head": head})
    r = ecoptim.memory_report(m)
    assert r.total_bytes == 10 * 8 * 4
    lin = ecoptim.quantize_(nn.Linear(32, 16, bias=False), "fp8", filter_fn=lambda mod, n: True)
    opt = ecoptim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 32)).sum().backward()
    opt.step()
    r = ecoptim.memory_report(lin, opt)
    # fp8 codes + 16 fp32 scales + exp_avg + exp_avg_sq (fp32) + the 4-byte step counter
    assert r.total_bytes == 512 + 16 * 4 + 2 * 512 * 4 + 4


def test_bad_arguments_raise_clear_value_errors():
    with pytest.raises(ValueError, match="unknown format"):
        ecoptim.quantize_(TinyLM(), "fp9")
    with pytest.raises(ValueError, match="does not divide the row length 32"):
        ecoptim.quantize_(TinyLM(), "int4", "group48")
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match="only floating-point weights"):
        ecoptim.quantize_(lin, "fp8", filter_fn=lambda m, n: isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match="unknown storage"):
        ecoptim.quantize_(TinyLM(), "fp8", storage="pretend")


def test_failed_quantize_leaves_model_untouched():
    m = TinyLM()
    m.blocks[1].down = nn.Linear(48, 32, bias=False)  # 48 is not divisible by 32
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="blocks.1.down.weight"):
        ecoptim.quantize_(m, "int4", "group32")
    assert not any(isinstance(p, QuantizedTensor) for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_writing_through_torch_ops_is_refused():
    lin = ecoptim.quantize_(nn.Linear(8, 8), "fp8", filter_fn=lambda m, n: True)
    lin(torch.randn(2, 8)).sum().backward()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, foreach=False)
    with pytest.raises(RuntimeError, match="ecoptim optimizer"):
        opt.step()


def test_state_dict_holds_codes_and_round_trips_bit_identically():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "int4", "group32")
    sd = m.state_dict()
    w = sd["blocks.0.up.weight"]
    assert isinstance(w, QuantizedTensor) and w.codes.dtype == torch.uint8
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True (the default) works
    m2 = ecoptim.quantize_(TinyLM(), "int4", "group32")
    m2.load_state_dict(loaded)
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        if isinstance(a, QuantizedTensor):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), n
        else:
            assert torch.equal(a, b), n
    # a checkpoint of another format or shape is refused with a message saying what differs
    m3 = ecoptim.quantize_(TinyLM(), "fp8")
    with pytest.raises(RuntimeError, match="int4/group32 quantized weight but the model expects fp8_e4m3/row"):
        m3.load_state_dict(loaded)
    # a dense checkpoint loads into a quantized model by quantizing it
    dense = TinyLM()
    m4 = ecoptim.quantize_(TinyLM(), "fp8")
    m4.load_state_dict(dense.state_dict())
    exp = QuantizedTensor.from_float(dense.blocks[0].up.weight.detach(), m4.blocks[0].up.weight.spec)
    assert torch.equal(m4.blocks[0].up.weight.dequantize(), exp.dequantize())


def test_deepcopy_and_device_move_keep_quantized_storage():
    m = ecoptim.quantize_(TinyLM(), "fp8")
    c = copy.deepcopy(m)
    w, cw = m.blocks[0].qkv.weight, c.blocks[0].qkv.weight
    assert isinstance(cw, nn.Parameter) and isinstance(cw, QuantizedTensor)
    assert cw.codes.data_ptr() != w.codes.data_ptr() and torch.equal(cw.dequantize(), w.dequantize())
    m.to("cpu")
    assert isinstance(m.blocks[0].qkv.weight, QuantizedTensor)


def _weights(model):
    return [p.dequantize() if isinstance(p, QuantizedTensor) else p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fmt,gran", SPECS)
def test_quant_config_quantizes_exactly_like_the_plain_names(fmt, gran):
    gran = "group16" if gran and gran.startswith("group") else gran  # TinyLM rows are 32 or 64 long
    torch.manual_seed(0)
    base = TinyLM()
    by_config = ecoptim.quantize_(copy.deepcopy(base), ecoptim.QuantConfig(fmt, gran))
    by_names = ecoptim.quantize_(copy.deepcopy(base), fmt, gran)
    for a, b in zip(by_config.parameters(), by_names.parameters()):
        assert type(a) is type(b)
        if isinstance(a, QuantizedTensor):
            assert a.spec == b.spec == F.QuantSpec.make(fmt, gran)
            assert torch.equal(a.codes.view(torch.uint8) if a.codes.dtype.itemsize == 1 else a.codes,
                               b.codes.view(torch.uint8) if b.codes.dtype.itemsize == 1 else b.codes)
            assert (a.scale is None) == (b.scale is None)
            assert a.scale is None or torch.equal(a.scale, b.scale)
        else:
            assert torch.equal(a, b)


def test_quant_config_is_a_frozen_value_resolved_at_construction():
    cfg = ecoptim.QuantConfig("fp8", "row")
    assert cfg == ecoptim.QuantConfig(F.FP8_E4M3, F.PerRow()) and hash(cfg) == hash(ecoptim.QuantConfig("e4m3", "row"))
    assert cfg.format is F.FP8_E4M3 and cfg.granularity == F.PerRow() and str(cfg) == "fp8_e4m3/row"
    assert cfg.spec == F.QuantSpec(F.FP8_E4M3, F.PerRow())
    assert ecoptim.QuantConfig("int4", 32).granularity == F.PerGroup(32)
    # granularity None: the format's default, as with the plain names
    assert ecoptim.QuantConfig("bf16").granularity == F.Unscaled()
    assert ecoptim.QuantConfig("int8").granularity == F.PerRow()
    with pytest.raises(AttributeError):
        cfg.format = F.INT4


@pytest.mark.parametrize("args,match", [
    (("fp9", "row"), r"QuantConfig: unknown format 'fp9'"),
    (("int4", "rows"), r"QuantConfig: unknown granularity 'rows'"),
    (("int4", "group0"), r"QuantConfig: group_size must be a positive int, got 0"),
    ((4, "row"), r"QuantConfig: format must be a name or an ecoptim Format, got int"),
    (("fp8", 2.5), r"QuantConfig: unknown granularity 2.5"),
])
def test_quant_config_rejects_bad_values_when_built(args, match):
    with pytest.raises(ValueError, match=match):
        ecoptim.QuantConfig(*args)


def test_quant_config_and_a_separate_granularity_is_an_error_before_any_change():
    m = TinyLM()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"put the granularity in the config: QuantConfig\('fp8_e4m3', 'row'\)"):
        ecoptim.quantize_(m, ecoptim.QuantConfig("fp8"), "row")
    assert not any(isinstance(p, QuantizedTensor) for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_storage_real_is_the_default_and_fake_keeps_dense_values_on_the_grid():
    torch.manual_seed(0)
    base = TinyLM()
    default = ecoptim.quantize_(copy.deepcopy(base), "int4", "group16")
    real = ecoptim.quantize_(copy.deepcopy(base), "int4", "group16", storage="real")
    fake = ecoptim.quantize_(copy.deepcopy(base), "int4", "group16", storage="fake")
    assert isinstance(default.blocks[0].qkv.weight, QuantizedTensor)
    assert not isinstance(fake.blocks[0].qkv.weight, QuantizedTensor)
    assert ecoptim.spec_of(fake.blocks[0].qkv.weight) == F.QuantSpec.make("int4", "group16")
    for a, b, c in zip(_weights(default), _weights(real), _weights(fake)):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("storage", ["real", "fake"])
def test_mode_is_a_deprecated_alias_of_storage(storage):
    torch.manual_seed(0)
    base = TinyLM()
    new = ecoptim.quantize_(copy.deepcopy(base), "fp8", storage=storage)
    with pytest.warns(DeprecationWarning, match=r"quantize_\(mode=\.\.\.\) is deprecated: use storage="):
        old = ecoptim.quantize_(copy.deepcopy(base), "fp8", mode=storage)
    assert isinstance(old.blocks[0].qkv.weight, QuantizedTensor) == (storage == "real")
    for a, b in zip(_weights(new), _weights(old)):
        assert torch.equal(a, b)


def test_storage_and_mode_together_are_an_error_before_any_change():
    m = TinyLM()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError,
                       match=r"both storage='fake' and its deprecated alias mode='real'; pass storage= only"):
        ecoptim.quantize_(m, "fp8", storage="fake", mode="real")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown storage 'pretend'"):
        ecoptim.quantize_(m, "fp8", mode="pretend")
    assert not any(isinstance(p, QuantizedTensor) for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
