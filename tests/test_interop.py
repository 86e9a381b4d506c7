"""ecoptim optimizers with the rest of the PyTorch ecosystem: LR schedulers, torch.amp (autocast, GradScaler),
gradient accumulation, torch.compile(model), and Hugging Face transformers.Trainer."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import ecoptim
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, lm_loss


def batches(n, seed=1, b=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (b, 17), generator=g) for _ in range(n)]


def codes_and_scales(model):
    out = []
    for p in model.parameters():
        if isinstance(p, QuantizedTensor):
            out += [p.codes.view(torch.uint8) if p.codes.dtype.itemsize == 1 else p.codes, p.scale]
        else:
            out.append(p.detach())
    return [t for t in out if t is not None]


# -- LR schedulers -------------------------------------------------------------------------------------------
SCHEDULERS = {
    "step": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "multistep": lambda o: S.MultiStepLR(o, milestones=[2, 4], gamma=0.3),
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.8),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=6, eta_min=1e-5),
    "cosine_to_zero": lambda o: S.CosineAnnealingLR(o, T_max=3),  # ECO sees lr == 0 at step 3
    "warm_restarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
    "lambda_warmup": lambda o: S.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3)),
    "linear": lambda o: S.LinearLR(o, start_factor=0.1, total_iters=4),
    "sequential": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.2, total_iters=2), S.CosineAnnealingLR(o, 4)],
                                           milestones=[2]),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=8),  # also cycles betas / momentum
    "plateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_torch_lr_schedulers_drive_ecoptim_like_torch_optim(name, opt_name):
    torch.manual_seed(0)
    ref = TinyLM(d=16, layers=1)
    ours = ecoptim.quantize_(copy.deepcopy(ref), "fp8")
    if opt_name == "adamw":
        o_ref, o_ours = torch.optim.AdamW(ref.parameters(), lr=3e-3), ecoptim.AdamW(ours.parameters(), lr=3e-3)
    else:
        o_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        o_ours = ecoptim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    s_ref, s_ours = SCHEDULERS[name](o_ref), SCHEDULERS[name](o_ours)
    hyper = ("lr", "betas" if opt_name == "adamw" else "momentum")
    w0 = [t.clone() for t in codes_and_scales(ours)]
    for idx in batches(6):
        losses = []
        for model, opt, sched in ((ref, o_ref, s_ref), (ours, o_ours, s_ours)):
            opt.zero_grad()
            loss = lm_loss(model, idx)
            loss.backward()
            opt.step()
            sched.step(loss.item()) if name == "plateau" else sched.step()
            losses.append(loss.item())
        assert [g[h] for g in o_ref.param_groups for h in hyper] == [g[h] for g in o_ours.param_groups for h in hyper]
    assert all(bool(torch.isfinite(w.float()).all()) for w in codes_and_scales(ours))
    assert any(not torch.equal(a, b) for a, b in zip(w0, codes_and_scales(ours)))
    assert ours.blocks[0].qkv.weight.codes.dtype == torch.float8_e4m3fn


# -- torch.amp -------------------------------------------------------------------------------------------------
def test_autocast_bf16_on_cpu_trains_quantized_weights():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    idx = batches(1, b=8)[0]
    with torch.no_grad():
        fp32_loss = lm_loss(m, idx).item()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(idx[:, :-1])
            assert logits.dtype == torch.bfloat16  # the matmuls really ran in bf16
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, 64), idx[:, 1:].reshape(-1))
        loss.backward()
        w = m.blocks[0].up.weight
        assert type(w.grad) is torch.Tensor and w.grad.dtype == torch.float32
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - fp32_loss) < 0.05
    assert losses[-1] < losses[0] - 0.3
    assert isinstance(m.blocks[0].up.weight, QuantizedTensor) and m.blocks[0].up.weight.codes.dtype == torch.float8_e4m3fn


def test_grad_scaler_steps_and_skips_overflowing_steps():
    torch.manual_seed(0)
    m = ecoptim.quantize_(TinyLM(), "fp8")
    opt = ecoptim.AdamW(m.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    data = batches(4)
    losses = []
    for i, idx in enumerate(data):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(m, idx)
        before = [t.clone() for t in codes_and_scales(m)]
        scaler.scale(loss * (float("inf") if i == 2 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        after = codes_and_scales(m)
        if i == 2:  # the scaler found inf and did not call step: nothing moved, scale backed off
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            assert scaler.get_scale() == 2.0 ** 9
        else:
            assert any(not torch.equal(a, b) for a, b in zip(before, after))
            losses.append(loss.item())
    assert opt.state[m.blocks[0].up.weight]["step"].item() == 3


# -- gradient accumulation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("fmt", ["fp32", "fp8"])
def test_gradient_accumulation_equals_one_full_batch_step(opt_name, fmt):
    """From the same trained state, 2 micro-batches of half size (loss/2 each) then one step == one step on the
    full batch, up to fp32 round-off in the gradient (deterministic rounding='nearest')."""
    torch.manual_seed(0)
    full = ecoptim.quantize_(TinyLM(), fmt)
    mk = {"sgd": lambda m: ecoptim.SGD(m.parameters(), lr=0.05, momentum=0.9, rounding="nearest"),
          "adamw": lambda m: ecoptim.AdamW(m.parameters(), lr=1e-3, rounding="nearest")}[opt_name]
    o_full = mk(full)
    data = batches(3, b=8)
    for idx in data[:2]:  # warm up: momentum / second moments are not zero any more
        o_full.zero_grad()
        lm_loss(full, idx).backward()
        o_full.step()
    accum = copy.deepcopy(full)
    o_acc = mk(accum)
    o_acc.load_state_dict(copy.deepcopy(o_full.state_dict()))
    idx = data[2]
    o_full.zero_grad()
    lm_loss(full, idx).backward()
    o_full.step()
    o_acc.zero_grad()
    for half in idx.chunk(2):
        (lm_loss(accum, half) / 2).backward()
    for pf, pa in zip(full.parameters(), accum.parameters()):
        torch.testing.assert_close(pa.grad, pf.grad, rtol=1e-4, atol=1e-6)
    o_acc.step()
    n_diff = n_total = 0
    for (name, pf), pa in zip(full.named_parameters(), accum.parameters()):
        if isinstance(pf, QuantizedTensor) and fmt != "fp32":
            wf, wa = pf.dequantize(), pa.dequantize()
            # round-off can only tip a value across a rounding boundary: at most one grid step apart
            s = pf.scale[:, None]
            y = wf.reshape(s.shape[0], -1) / s
            step = (pf.spec.format.spacing(y.abs()) * s).reshape(wf.shape)
            assert bool(((wf - wa).abs() <= step).all()), name
            # a row whose absmax differs by round-off gets a scale one ulp apart: same codes, values 1 ulp apart
            torch.testing.assert_close(pa.scale, pf.scale, rtol=1e-6, atol=0)
            n_diff += int((pf.codes.view(torch.uint8) != pa.codes.view(torch.uint8)).sum())
            n_total += wf.numel()
        else:
            wf = pf.dequantize() if isinstance(pf, QuantizedTensor) else pf.detach()
            wa = pa.dequantize() if isinstance(pa, QuantizedTensor) else pa.detach()
            torch.testing.assert_close(wa, wf, rtol=1e-5, atol=1e-7)
    if n_total:
        assert n_diff <= 0.001 * n_total


# -- torch.compile ------------------------------------------------------------------------------------------
def _compile_run(storage, backend, steps=3):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    base = TinyLM(d=32, layers=1)
    # quantize each copy: copy.deepcopy drops a fake-quantized parameter's spec tag (nn.Parameter.__deepcopy__
    # keeps no Python attributes), real QuantizedTensor storage survives it
    eager = ecoptim.quantize_(copy.deepcopy(base), "fp8", storage=storage)
    comp = ecoptim.quantize_(copy.deepcopy(base), "fp8", storage=storage)
    o_e = ecoptim.AdamW(eager.parameters(), lr=3e-3, seed=3)
    o_c = ecoptim.AdamW(comp.parameters(), lr=3e-3, seed=3)
    compiled = torch.compile(comp, backend=backend, fullgraph=True)  # fullgraph: no graph break allowed
    for idx in batches(steps):
        losses = []
        for model, opt in ((eager, o_e), (compiled, o_c)):
            opt.zero_grad()
            loss = lm_loss(model, idx)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert math.isclose(losses[0], losses[1], rel_tol=1e-5)
    if storage == "real":
        assert isinstance(comp.blocks[0].qkv.weight, QuantizedTensor)
        assert comp.blocks[0].qkv.weight.codes.dtype == torch.float8_e4m3fn
    return eager, comp


@pytest.mark.parametrize("storage", ["real", "fake"])
def test_torch_compile_forward_backward_and_ecoptim_step(storage):
    """QuantizedTensor is a traceable wrapper subclass (__tensor_flatten__/__tensor_unflatten__): dynamo and AOT
    autograd trace through it in one graph, and the weights the optimizer rewrites in place are read anew."""
    eager, comp = _compile_run(storage, "aot_eager")
    for a, b in zip(codes_and_scales(eager), codes_and_scales(comp)):
        assert torch.equal(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # no recompilation after steps


def test_torch_compile_inductor():
    """The real C++ backend (slow to compile: ~40 s here). Inductor's kernels may round differently from ATen
    in the last bit, so the quantized codes must agree almost everywhere rather than bit for bit."""
    eager, comp = _compile_run("real", "inductor")
    same = total = 0
    for a, b in zip(codes_and_scales(eager), codes_and_scales(comp)):
        if a.dtype.is_floating_point and a.dtype.itemsize == 4:  # scales
            torch.testing.assert_close(b, a, rtol=1e-3, atol=0)
        else:
            same += int((a.view(torch.uint8) == b.view(torch.uint8)).sum())
            total += a.numel()
    assert total > 0 and same >= 0.99 * total


# -- Hugging Face transformers.Trainer -----------------------------------------------------------------------
def test_transformers_trainer_with_ecoptim_adamw(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)  # built from the config: nothing is downloaded
    ecoptim.quantize_(model, "fp8", "row")
    quantized = {n for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)}
    assert "model.layers.0.mlp.up_proj.weight" in quantized and "lm_head.weight" not in quantized
    up = model.model.layers[0].mlp.up_proj.weight
    codes0 = up.codes.view(torch.uint8).clone()

    class Tokens(torch.utils.data.Dataset):  # a tiny in-memory corpus: 4 repeated sequences
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randint(0, 128, (4, 16), generator=g).repeat(4, 1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    steps = 16
    opt = ecoptim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, mode="eco", rounding="stochastic")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    up = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(up, QuantizedTensor) and up.codes.dtype == torch.float8_e4m3fn
    assert not torch.equal(up.codes.view(torch.uint8), codes0)
    assert opt.state[up]["step"].item() == steps and sched.last_epoch == steps
    assert {n for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)} == quantized
