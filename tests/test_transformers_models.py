"""Real ``transformers`` models, built from small configs (no hub): quantize, train with ECO, checkpoint.

Llama (dense ``nn.Linear`` projections), Qwen3-MoE and Mixtral (experts fused into 3-D parameters [E, out, in];
Qwen3-MoE run by each of transformers' expert implementations), Switch Transformers (one ``nn.Linear`` per
expert: transformers 5 builds Mixtral and OLMoE with fused experts) and GPT-2
(``Conv1D``, weight stored (in, out)). For each: the default filter quantizes at least 95% of the parameters
outside the embeddings and the LM head; real storage gives the same logits and gradients, bit for bit, as
fake storage (dense weights on the grid); ECO AdamW's fused kernel equals its reference path bit for bit; a
checkpoint round trip restores codes, scales and moments.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ecoptim
from ecoptim import kernels
from ecoptim.convert import QuantizeReport, infer_in_dim, spec_of
from ecoptim.formats import PerGroup, PerRow, QuantSpec
from ecoptim.optim import fused
from ecoptim.qtensor import QuantizedTensor

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def _qwen3_moe(experts_implementation: str = "eager") -> nn.Module:
    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=32)
    cfg._experts_implementation = experts_implementation
    return transformers.Qwen3MoeForCausalLM(cfg)


def _mixtral() -> nn.Module:
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    return transformers.MixtralForCausalLM(cfg)


def _switch() -> nn.Module:
    cfg = transformers.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=2, num_sparse_encoder_layers=1,
                                                num_sparse_decoder_layers=1, num_heads=4, num_experts=4,
                                                expert_capacity=16, decoder_start_token_id=0, pad_token_id=0,
                                                dropout_rate=0.0, router_jitter_noise=0.0)
    return transformers.SwitchTransformersForConditionalGeneration(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {"llama": _llama, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "switch": _switch, "gpt2": _gpt2}
# the paper's settings: FP8 per row for pre-training, INT4 for the MoE fine-tune (per row here: per tensor
# leaves nothing to check about rows within experts)
FORMATS = {"llama": "fp8_e4m3", "qwen3_moe": "int4", "mixtral": "int4", "switch": "int4", "gpt2": "fp8_e4m3"}


def _build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.config.use_cache = False
    return model


def _batch(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 12), generator=g)
    if name == "switch":
        return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (2, 6), generator=g)}
    return {"input_ids": ids, "labels": ids}


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.loss if not isinstance(out.loss, tuple) else out.loss[0]


def _is_embedding_or_head(name: str) -> bool:
    return any(k in name for k in ("embed", "wte", "wpe", "lm_head", "shared", "relative_attention_bias"))


# -- 1. what quantize_ selects -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_default_filter_quantizes_the_blocks(name: str) -> None:
    model = _build(name)
    report = QuantizeReport()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense that the default filter cannot place
        ecoptim.quantize_(model, FORMATS[name], report=report)
    mem = ecoptim.memory_report(model)
    assert mem.quantized_fraction(exclude=_is_embedding_or_head) >= 0.95, mem.table()
    kept = {e.reason for e in report.skipped}
    assert kept <= {"embedding", "tied to an embedding", "output head", "router", "norm", "bias", "vector"}, kept
    for e in report.skipped:  # routers, heads and norms stay dense
        p = dict(model.named_parameters())[e.name] if e.name in dict(model.named_parameters()) else None
        assert p is None or not isinstance(p, QuantizedTensor)
    assert report.selected_numel + report.skipped_numel == sum(p.numel() for p in model.parameters())
    assert "left dense" in report.summary() and report.table().count("\n") == len(report.selected) + len(
        report.skipped) + 1


def test_qwen3_moe_experts_get_a_scale_per_expert_row() -> None:
    model = _build("qwen3_moe")
    ecoptim.quantize_(model, "int4", "row")
    experts = model.model.layers[0].mlp.experts
    w = experts.gate_up_proj
    assert isinstance(w, QuantizedTensor) and w.spec.granularity == PerRow(in_dim=-1)
    e, out, _ = w.shape
    assert w.scale.shape == (e * out,)
    # each expert's each row is quantized on its own: the scale is its absmax / 7
    dense = w.dequantize()
    assert torch.equal(w.scale.view(e, out), (dense.abs().amax(dim=-1) / 7).clamp(min=w.scale.min()))
    assert not isinstance(model.model.layers[0].mlp.gate.weight, QuantizedTensor)  # the router
    assert not isinstance(model.lm_head.weight, QuantizedTensor)
    assert not isinstance(model.model.embed_tokens.weight, QuantizedTensor)
    # groups run along `in` within each expert row
    model = _build("qwen3_moe")
    ecoptim.quantize_(model, "int4", "group16")
    w = model.model.layers[0].mlp.experts.down_proj
    assert w.spec.granularity == PerGroup(16, in_dim=-1) and w.scale.numel() == w.numel() // 16


def test_gpt2_conv1d_gets_a_scale_per_output_column() -> None:
    model = _build("gpt2")
    dense = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [in, out]
    ecoptim.quantize_(model, "int8", "row")
    w = model.transformer.h[0].attn.c_attn.weight
    assert w.spec.granularity == PerRow(in_dim=-2) and w.scale.shape == (dense.shape[1],)
    assert torch.equal(w.scale, dense.abs().amax(dim=0) / 127)
    assert not fused.applies(w, w.spec, {"mode": "eco", "lr": 1e-3})  # codes stored transposed: reference path


def test_module_filter_cannot_reach_experts_and_says_so() -> None:
    model = _build("qwen3_moe")
    with pytest.warns(UserWarning, match=r"leaves 4 parameters dense .*gate_up_proj.*param_name"):
        ecoptim.quantize_(model, "int4", filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    # a parameter filter selects them by name
    model = _build("qwen3_moe")
    ecoptim.quantize_(model, "int4", filter_fn=lambda m, fqn, name: name in ("gate_up_proj", "down_proj"))
    quantized = {n for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)}
    assert quantized == {f"model.layers.{i}.mlp.experts.{k}" for i in range(2) for k in ("gate_up_proj", "down_proj")}


def test_explicit_in_dim_and_layout_inference() -> None:
    model = _build("qwen3_moe")
    ecoptim.quantize_(model, "fp8", PerRow(in_dim=-1), filter_fn=lambda m, fqn, name: name == "down_proj")
    assert model.model.layers[0].mlp.experts.down_proj.spec.granularity == PerRow(in_dim=-1)
    lin = nn.Linear(4, 3)
    assert infer_in_dim(lin, "weight", lin.weight) is None
    with pytest.raises(ValueError, match="in_dim must be one of"):
        PerRow(in_dim=0)
    with pytest.raises(ValueError, match="needs at least 2 dims"):
        QuantizedTensor.from_float(torch.ones(4), QuantSpec.make("fp8", PerRow(in_dim=-2)))


def test_transposed_experts_and_unknown_layouts() -> None:
    class TransposedExperts(nn.Module):  # as transformers' use_experts_implementation(is_transposed=True) marks them
        is_transposed = True

        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(3, 16, 8))   # [E, in, out]
            self.packed = nn.Parameter(torch.randn(24, 16))          # 2-D, layout unknown (e.g. DBRX's w1)

    model = nn.Sequential(TransposedExperts())
    dense = model[0].gate_up_proj.detach().clone()
    report = QuantizeReport()
    with pytest.warns(UserWarning, match=r"leaves 1 parameters dense \(1536 bytes\): 0.packed; their layout"):
        ecoptim.quantize_(model, "int8", "row", report=report)
    w = model[0].gate_up_proj
    assert w.spec.granularity == PerRow(in_dim=-2) and w.scale.shape == (3 * 8,)
    assert torch.equal(w.scale.view(3, 8), dense.abs().amax(dim=1) / 127)  # per expert and output column
    assert [e.name for e in report.skipped] == ["0.packed"] and report.skipped[0].nbytes == 1536


def test_tied_parameter_is_converted_once_and_stays_tied() -> None:
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    ecoptim.quantize_(model, "fp8", filter_fn=lambda m, fqn, name: isinstance(m, nn.Linear))
    assert isinstance(model[0].weight, QuantizedTensor) and model[0].weight is model[1].weight


# -- 2. ops on 3-D quantized parameters: real == fake, bit for bit -------------------------------------
def _real_and_fake(shape, spec_gran="row", fmt="int4", seed=0):
    torch.manual_seed(seed)
    w = torch.randn(*shape)
    holder = nn.Module()
    holder.w = nn.Parameter(w.clone())
    real, fake = copy.deepcopy(holder), copy.deepcopy(holder)
    sel = lambda m, fqn, name: name == "w"  # noqa: E731
    ecoptim.quantize_(real, fmt, spec_gran, filter_fn=sel)
    ecoptim.quantize_(fake, fmt, spec_gran, filter_fn=sel, storage="fake")
    assert isinstance(real.w, QuantizedTensor) and spec_of(fake.w) == real.w.spec
    assert torch.equal(real.w.dequantize(), fake.w.detach())
    return real.w, fake.w


EXPERT_OPS = {
    "index_expert": lambda w, x: F.linear(x, w[1]),
    "index_tensor": lambda w, x: F.linear(x, w[torch.tensor(2)]),
    "gather_experts": lambda w, x: torch.bmm(w[torch.tensor([0, 3, 3, 1])], x[:4].unsqueeze(-1)).squeeze(-1),
    "bmm": lambda w, x: torch.bmm(x[:4].reshape(4, 1, -1), w.transpose(-2, -1)),
    "linear_on_slice": lambda w, x: F.linear(x, w[2, :5]),
    "matmul": lambda w, x: torch.matmul(x[:4].unsqueeze(1), w.transpose(1, 2)),
    "einsum": lambda w, x: torch.einsum("eoi,ti->teo", w, x),
    "unbind": lambda w, x: sum(F.linear(x, we) for we in w.unbind(0)),
    "grouped_mm": lambda w, x: torch._grouped_mm(x, w.transpose(-2, -1),
                                                 offs=torch.tensor([2, 3, 6, 8], dtype=torch.int32)),
}


@pytest.mark.parametrize("op", list(EXPERT_OPS))
def test_expert_ops_real_equals_fake(op: str) -> None:
    real, fake = _real_and_fake((4, 8, 16))
    x = torch.randn(8, 16)
    try:
        out_fake = EXPERT_OPS[op](fake, x)
    except (RuntimeError, NotImplementedError) as e:  # an op this torch build has no CPU kernel for
        pytest.skip(f"{op}: {e}")
    out_real = EXPERT_OPS[op](real, x)
    assert type(out_real) is torch.Tensor and torch.equal(out_real, out_fake)
    g = torch.randn_like(out_fake)
    (gr,) = torch.autograd.grad(out_real, real, g)
    (gf,) = torch.autograd.grad(out_fake, fake, g)
    assert type(gr) is torch.Tensor and torch.equal(gr, gf)


def test_writes_into_a_quantized_weight_raise() -> None:
    real, _ = _real_and_fake((4, 8, 16))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="would write into a QuantizedTensor"):
            real.mul_(2)
        with pytest.raises(RuntimeError, match="would write into a QuantizedTensor"):
            real[1].zero_()  # a view of one expert: writing into it would only change a temporary
        with pytest.raises(RuntimeError, match="would write into a QuantizedTensor"):
            real.transpose(-2, -1)[0].add_(1)
        view = real[1]
    assert type(view.detach() * 1) is torch.Tensor  # reads give plain tensors


# -- 3. whole models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "mixtral", "switch", "gpt2"] + [
    f"qwen3_moe:{impl}" for impl in ("eager", "batched_mm", "grouped_mm")])
def test_forward_backward_real_equals_fake(name: str) -> None:
    arch, _, impl = name.partition(":")
    torch.manual_seed(0)
    base = _qwen3_moe(impl) if impl else _build(arch)
    base.config.use_cache = False
    real, fake = copy.deepcopy(base), copy.deepcopy(base)
    ecoptim.quantize_(real, FORMATS[arch])
    ecoptim.quantize_(fake, FORMATS[arch], storage="fake")
    batch = _batch(arch)
    lr_, lf = _loss(real, batch), _loss(fake, batch)
    assert torch.equal(lr_, lf)
    lr_.backward()
    lf.backward()
    for (n, a), (_, b) in zip(real.named_parameters(), fake.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert type(a.grad) is torch.Tensor and torch.equal(a.grad, b.grad), n


def _assert_same_training_state(ref, fast, o_ref, o_fast) -> None:
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        if isinstance(a, QuantizedTensor):
            assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), f"codes differ: {n}"
            assert (a.scale is None) == (b.scale is None) and (a.scale is None or torch.equal(a.scale, b.scale)), n
        else:
            assert torch.equal(a, b), n
        sa, sb = o_ref.state[a], o_fast.state[b]
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), f"state {k!r} differs: {n}"


@pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_eco_adamw_fused_equals_reference(name: str, rounding: str) -> None:
    base = _build(name)
    ecoptim.quantize_(base, FORMATS[name])
    ref, fast = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(lr=3e-3, weight_decay=0.1, rounding=rounding, seed=5)
    o_ref = ecoptim.AdamW(ref.parameters(), fused=False, **kw)
    o_fast = ecoptim.AdamW(fast.parameters(), **kw)
    quantized = [p for p in fast.parameters() if isinstance(p, QuantizedTensor)]
    losses = []
    for step in range(3):
        batch = _batch(name, seed=10 + step)
        for model, opt in ((ref, o_ref), (fast, o_fast)):
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            if model is fast:
                applied = [fused.applies(p, p.spec, o_fast.param_groups[0]) for p in quantized]
                losses.append(float(loss.detach()))
            opt.step()
        _assert_same_training_state(ref, fast, o_ref, o_fast)
    # the fused kernel ran on every weight whose codes are in logical order (all but GPT-2's Conv1D)
    assert all(applied) == (name != "gpt2") and (name != "gpt2" or not any(applied))
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_round_trip(name: str, tmp_path) -> None:
    model = _build(name)
    ecoptim.quantize_(model, FORMATS[name])
    opt = ecoptim.AdamW(model.parameters(), lr=1e-3)
    batch = _batch(name)
    _loss(model, batch).backward()
    opt.step()
    ecoptim.save_checkpoint(tmp_path / "ck.pt", model, opt, step=1)
    ecoptim.export_safetensors(model, tmp_path / "m.safetensors")

    other = _build(name, seed=7)
    ecoptim.quantize_(other, FORMATS[name])
    o2 = ecoptim.AdamW(other.parameters(), lr=1e-3)
    ecoptim.load_checkpoint(tmp_path / "ck.pt", other, o2)
    _assert_same_training_state(model, other, opt, o2)
    assert torch.equal(_loss(model, batch), _loss(other, batch))

    third = _build(name, seed=8)
    ecoptim.quantize_(third, FORMATS[name])
    ecoptim.load_safetensors(third, tmp_path / "m.safetensors")
    for (n, a), (_, b) in zip(model.named_parameters(), third.named_parameters()):
        if isinstance(a, QuantizedTensor):
            assert a.spec == b.spec and torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)), n
            assert torch.equal(a.scale, b.scale), n


def test_transformers_trainer_on_the_moe(tmp_path) -> None:
    model = _build("qwen3_moe")
    ecoptim.quantize_(model, "int4", "row")
    before = model.model.layers[0].mlp.experts.gate_up_proj.codes.clone()
    opt = ecoptim.AdamW(model.parameters(), lr=1e-2, mode="eco")
    data = [_batch("qwen3_moe", seed=s) for s in range(8)]
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in data for i in range(2)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                                          max_grad_norm=1.0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(after, QuantizedTensor) and not torch.equal(before, after.codes)  # the experts trained


@pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("fmt,gran", [("fp8_e4m3", "row"), ("int4", "group8"), ("int8", "tensor"), ("bf16", None),
                                      ("int4", PerRow(in_dim=-2))])
@pytest.mark.parametrize("mode", ["eco", "naive", "master"])
def test_fused_equals_reference_on_an_expert_stack(fmt, gran, mode) -> None:
    # [E, out, in] with rows of very different magnitudes: per-row scales within experts matter
    torch.manual_seed(3)
    holder = nn.Module()
    holder.w = nn.Parameter(torch.randn(3, 8, 16) * torch.logspace(-3, 0, 8)[:, None])
    ecoptim.quantize_(holder, fmt, gran, filter_fn=lambda m, fqn, name: name == "w")
    ref, fast = copy.deepcopy(holder), copy.deepcopy(holder)
    kw = dict(lr=1e-2, weight_decay=0.1, mode=mode, rounding="stochastic", seed=2)
    o_ref, o_fast = ecoptim.AdamW(ref.parameters(), fused=False, **kw), ecoptim.AdamW(fast.parameters(), **kw)
    for step in range(3):
        g = torch.randn(3, 8, 16)
        for model, opt in ((ref, o_ref), (fast, o_fast)):
            opt.zero_grad()
            model.w.grad = g.clone()
            opt.step()
        _assert_same_training_state(ref, fast, o_ref, o_fast)
    transposed = isinstance(gran, PerRow)
    assert fused.applies(fast.w, fast.w.spec, o_fast.param_groups[0]) == (not transposed)


def test_multihead_attention_projections_are_selected() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ecoptim.quantize_(layer, "fp8")
    quantized = {n for n, p in layer.named_parameters() if isinstance(p, QuantizedTensor)}
    assert quantized == {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"}
    layer.eval()
    with torch.no_grad():  # torch's fused inference path reads the quantized projections too
        assert torch.isfinite(layer(torch.randn(2, 5, 16))).all()
    layer.train()
    layer(torch.randn(2, 5, 16)).sum().backward()
    assert layer.self_attn.in_proj_weight.grad is not None


@pytest.mark.parametrize("shape", [(3, 8, 16), (3, 5, 7), (2, 3, 4, 6)])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4", "bf16"])
@pytest.mark.parametrize("gran", ["row", "tensor", "group2", "row[in=-1]", "row[in=-2]", "group2[in=-1]"])
def test_one_expert_is_read_without_dequantizing_the_stack(shape, fmt, gran) -> None:
    # w[e] dequantizes one expert (an eager expert loop would otherwise dequantize the whole stack E times); the
    # values are bit for bit those of the whole dequantized stack, whatever the granularity and packing
    if gran.startswith("group2") and shape[-1] % 2:  # an odd row cannot be split in groups of 2: refused
        with pytest.raises(ValueError, match="group size 2 does not divide the row length"):
            QuantizedTensor.from_float(torch.randn(*shape), QuantSpec.make(fmt, gran))
        return
    q = QuantizedTensor.from_float(torch.randn(*shape), QuantSpec.make(fmt, gran))
    full = q.dequantize()
    for e in range(-shape[0], shape[0]):
        assert torch.equal(q[e]._dense, full[e])
        one = q._dequantize_index(0, e)
        assert one is None or torch.equal(one, full[e])
    packed_odd = fmt == "int4" and (shape[1] * shape[2] * (shape[3] if len(shape) > 3 else 1)) % 2
    assert (q._dequantize_index(0, 1) is None) == bool(packed_odd)  # an expert of odd size splits a byte
