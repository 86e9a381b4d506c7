"""The Llama-style model: shapes, causality, that it learns, and what quantize_ selects in it."""
from __future__ import annotations

import math

import pytest
import torch

import ecoptim
from ecoptim.convert import is_quantized
from ecoptim.app.model import PRESETS, LlamaConfig, LlamaLM, apply_rope, is_block_linear, precompute_rope

BLOCK_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")


def tiny(**overrides: int) -> LlamaLM:
    torch.manual_seed(0)
    return LlamaLM(LlamaConfig.preset("tiny", **overrides))


def test_shapes_and_initial_loss() -> None:
    model = tiny()
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, 256)
    assert loss.shape == () and loss.dtype == torch.float32
    # small init => nearly uniform predictions over 256 bytes
    assert abs(loss.item() - math.log(256)) < 0.1
    logits2, none = model(idx)
    assert none is None and torch.equal(logits, logits2)


def test_causal_mask_future_tokens_do_not_change_the_past() -> None:
    model = tiny().eval()
    idx = torch.randint(0, 256, (2, 24))
    changed = idx.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_rope_relative_positions() -> None:
    cos, sin = precompute_rope(16, 32)
    q, k = torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation
    # the same q/k vectors placed at positions (m, n) and (m + 5, n + 5) give the same score
    q2, k2 = q.clone(), k.clone()
    q2[..., 12, :], k2[..., 9, :] = q[..., 7, :], k[..., 4, :]
    rq2, rk2 = apply_rope(q2, cos, sin), apply_rope(k2, cos, sin)
    torch.testing.assert_close((rq[..., 7, :] * rk[..., 4, :]).sum(), (rq2[..., 12, :] * rk2[..., 9, :]).sum())


def test_model_sees_token_order() -> None:
    # without position information, swapping two earlier tokens would not change a later prediction
    model = tiny().eval()
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    swapped = idx.clone()
    swapped[0, [0, 1]] = idx[0, [1, 0]]
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0][0, -1], model(swapped)[0][0, -1], atol=1e-5)


def test_loss_decreases_on_a_tiny_batch() -> None:
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_quantize_default_filter_skips_head_and_embedding() -> None:
    model = tiny()
    ecoptim.quantize_(model, "fp8_e4m3")
    quantized = {n for n, p in model.named_parameters() if is_quantized(p)}
    expected = {f"blocks.{i}.{name}.weight" for i in range(model.cfg.n_layers) for name in BLOCK_LINEARS}
    assert quantized == expected
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.embed.weight)
    _, loss = model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))
    loss.backward()  # gradients flow through the quantized weights
    assert model.blocks[0].attn.q_proj.weight.grad is not None


def test_block_filter_when_d_model_equals_vocab() -> None:
    # d_model == vocab_size (256) fools a vocabulary-size heuristic; is_block_linear selects by name.
    torch.manual_seed(0)
    model = LlamaLM(LlamaConfig(d_model=256, n_layers=1, n_heads=4, ffn_hidden=128, max_seq_len=16))
    ecoptim.quantize_(model, "fp8_e4m3", filter_fn=is_block_linear)
    quantized = {n for n, p in model.named_parameters() if is_quantized(p)}
    assert quantized == {f"blocks.0.{name}.weight" for name in BLOCK_LINEARS}


def test_presets_sizes_and_config_validation() -> None:
    counts = {name: LlamaLM(LlamaConfig.preset(name)).num_params() for name in ("tiny", "small")}
    assert 50_000 < counts["tiny"] < 200_000
    assert 2_000_000 < counts["small"] < 4_000_000
    with pytest.raises(ValueError, match="divisible"):
        LlamaConfig(d_model=60, n_heads=7)
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.preset("huge")
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))
    cfg = LlamaConfig.preset("tiny", d_model=32, n_layers=None)
    assert cfg.d_model == 32 and cfg.n_layers == PRESETS["tiny"]["n_layers"]
    assert LlamaConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg


def test_residual_projections_have_scaled_init() -> None:
    model = LlamaLM(LlamaConfig.preset("small", n_layers=2))
    std_q = model.blocks[0].attn.q_proj.weight.std().item()
    std_o = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.001
    assert abs(std_o - 0.02 / math.sqrt(4)) < 0.001
