"""Checkpoints: atomic writes, refusal of truncated / corrupt / mismatched files, safetensors, exact resume."""
import copy
import json
import math
import os
import sys

import pytest
import torch
from torch import nn

import ecoptim
from ecoptim.checkpoint import export_safetensors, load_checkpoint, load_safetensors, save_checkpoint
from ecoptim.qtensor import QuantizedTensor
from conftest import TinyLM, batches, lm_loss, train




def snapshot(model):
    """Every stored bit of the model: codes and scales of quantized weights, dense tensors as they are."""
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, QuantizedTensor):
            out[k + ".codes"] = v.codes.view(torch.uint8).clone() if v.codes.dtype.itemsize == 1 else v.codes.clone()
            if v.scale is not None:
                out[k + ".scale"] = v.scale.clone()
        else:
            out[k] = v.clone()
    return out


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_state(x, y, path="state"):
    """Nested optimizer / scheduler state_dicts equal, tensors bit for bit."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), path
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x:
            assert_same_state(x[k], y[k], f"{path}/{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same_state(u, v, f"{path}/{i}")
    else:
        assert x == y, path


def trained(fmt="fp8", gran=None, steps=2, seed=0):
    torch.manual_seed(seed)
    m = ecoptim.quantize_(TinyLM(), fmt, gran)
    opt = ecoptim.AdamW(m.parameters(), lr=2e-3, seed=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    train(m, opt, batches(steps), sched)
    return m, opt, sched


def test_checkpoint_stores_codes_and_scales_not_floats(tmp_path):
    lin = nn.Sequential(nn.Linear(256, 256, bias=False))
    ecoptim.quantize_(lin, "fp8", "row", filter_fn=lambda m, n: isinstance(m, nn.Linear))
    path = save_checkpoint(tmp_path / "ck.pt", lin)
    raw = torch.load(path, weights_only=True)
    w = raw["model"]["0.weight"]
    assert isinstance(w, QuantizedTensor) and w.codes.dtype == torch.float8_e4m3fn and w.scale.shape == (256,)
    # 64 KiB of codes + 1 KiB of scales; dequantized fp32 would be 256 KiB
    assert os.path.getsize(path) < 256 * 256 * 4 / 2
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]  # no temp file left behind


def test_failing_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    m, opt, sched = trained()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, m, opt, sched, step=2)
    before = path.read_bytes()
    train(m, opt, batches(1, seed=7), sched)
    # 1) the payload cannot be pickled: torch.save fails after it started writing
    with pytest.raises(Exception):
        save_checkpoint(path, m, opt, sched, step=3, extra={"callback": lambda: None})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ck.pt"]

    # 2) the machine "crashes" between writing the temp file and renaming it
    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, m, opt, sched, step=3)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ck.pt"]
    # and the intact old checkpoint still loads
    m2, opt2, sched2 = trained(seed=1, steps=1)
    assert load_checkpoint(path, m2, opt2, sched2)["step"] == 2


@pytest.mark.parametrize("damage", ["half", "tail", "empty", "bitflip", "garbage"])
def test_truncated_or_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path, damage):
    m, opt, sched = trained()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, m, opt, sched)
    data = bytearray(path.read_bytes())
    if damage == "half":
        data = data[: len(data) // 2]
    elif damage == "tail":
        data = data[:-16]
    elif damage == "empty":
        data = bytearray()
    elif damage == "bitflip":  # inside the stored codes of one weight: only the checksum can tell
        codes = m.blocks[0].up.weight.codes.view(torch.uint8)
        i = bytes(data).find(codes[:64].numpy().tobytes())
        assert i > 0
        data[i + 3] ^= 0x10
    else:
        data = bytearray(b"not a checkpoint at all" * 10)
    path.write_bytes(bytes(data))
    target, topt, tsched = trained(seed=3, steps=1)
    w0, o0, s0 = snapshot(target), copy.deepcopy(topt.state_dict()), copy.deepcopy(tsched.state_dict())
    with pytest.raises(ValueError, match="ck.pt") as ei:
        load_checkpoint(path, target, topt, tsched)
    msg = str(ei.value)
    assert ("checksum mismatch for ['/model/blocks.0.up.weight.codes']" in msg if damage == "bitflip"
            else "truncated, corrupt" in msg)
    assert_same_bits(w0, snapshot(target))
    assert_same_state(o0, topt.state_dict())
    assert_same_state(s0, tsched.state_dict())


def _set_scale_none(m):
    m.blocks[0].up.weight.scale = None  # a writer that dropped the scale
    return m


# (how to build the model that is saved, how to build the one loaded into, expected message)
MISMATCHES = {
    "format": (lambda: ecoptim.quantize_(TinyLM(), "fp8"), lambda: ecoptim.quantize_(TinyLM(), "int4", "row"),
               "blocks.0.qkv.weight: format differs: checkpoint fp8_e4m3/row, model int4/row"),
    "granularity": (lambda: ecoptim.quantize_(TinyLM(), "fp8", "row"),
                    lambda: ecoptim.quantize_(TinyLM(), "fp8", "tensor"),
                    "blocks.0.qkv.weight: granularity differs: checkpoint fp8_e4m3/row, model fp8_e4m3/tensor"),
    "shape": (lambda: ecoptim.quantize_(TinyLM(d=32), "fp8"), lambda: ecoptim.quantize_(TinyLM(d=48), "fp8"),
              "blocks.0.qkv.weight: shape differs: checkpoint (96, 32), model (144, 48)"),
    "missing_scale": (lambda: _set_scale_none(ecoptim.quantize_(TinyLM(), "fp8")),
                      lambda: ecoptim.quantize_(TinyLM(), "fp8"),
                      "blocks.0.up.weight: missing scale: the model's fp8_e4m3/row weight needs 128 fp32 scales"),
    "dense_vs_quantized": (lambda: TinyLM(), lambda: ecoptim.quantize_(TinyLM(), "fp8"),
                           "blocks.0.qkv.weight: the model stores a fp8_e4m3/row quantized weight of shape (96, 32) "
                           "but the checkpoint holds a dense float32 tensor"),
    "quantized_vs_dense": (lambda: ecoptim.quantize_(TinyLM(), "int8"), lambda: TinyLM(),
                           "blocks.1.proj.weight: the checkpoint holds a int8/row quantized weight of shape (32, 32) "
                           "but the model's parameter is a dense float32 tensor"),
    "missing_keys": (lambda: ecoptim.quantize_(TinyLM(layers=1), "fp8"), lambda: ecoptim.quantize_(TinyLM(), "fp8"),
                     "missing keys (in the model, not in the checkpoint): ['blocks.1.norm1.weight'"),
    "unexpected_keys": (lambda: ecoptim.quantize_(TinyLM(layers=3), "fp8"),
                        lambda: ecoptim.quantize_(TinyLM(), "fp8"),
                        "unexpected keys (in the checkpoint, not in the model): ['blocks.2.norm1.weight'"),
    "dtype": (lambda: ecoptim.quantize_(TinyLM(), "fp8"), lambda: ecoptim.quantize_(TinyLM().to(torch.bfloat16), "fp8"),
              "emb.weight: dtype differs: checkpoint torch.float32, model torch.bfloat16"),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_mismatched_checkpoint_is_refused_with_what_differs(tmp_path, kind):
    make_saved, make_target, expected = MISMATCHES[kind]
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck.pt", make_saved())
    torch.manual_seed(1)
    target = make_target()
    opt = ecoptim.AdamW(target.parameters(), lr=1e-3)
    before, opt_before = snapshot(target), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as ei:
        load_checkpoint(tmp_path / "ck.pt", target)
    msg = str(ei.value)
    assert "ck.pt" in msg and "nothing was loaded" in msg
    assert expected in msg, msg
    assert_same_bits(before, snapshot(target))
    assert_same_state(opt_before, opt.state_dict())


def test_mismatched_optimizer_or_scheduler_is_refused_and_nothing_changes(tmp_path):
    m, opt, sched = trained()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, m, opt, sched)
    t, topt, tsched = trained(seed=2, steps=1)
    before = snapshot(t)
    sgd = ecoptim.SGD(t.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"optimizer class differs: checkpoint ecoptim\.optim\.adamw\.AdamW, "
                                         r"given ecoptim\.optim\.sgd\.SGD"):
        load_checkpoint(path, t, sgd)
    two_groups = ecoptim.AdamW([{"params": list(t.parameters())[:3]}, {"params": list(t.parameters())[3:]}])
    with pytest.raises(ValueError, match="1 parameter groups, the given one has 2"):
        load_checkpoint(path, t, two_groups)
    step_lr = torch.optim.lr_scheduler.StepLR(topt, 5)
    with pytest.raises(ValueError, match="LR scheduler class differs"):
        load_checkpoint(path, t, topt, step_lr)
    save_checkpoint(tmp_path / "model_only.pt", m)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "model_only.pt", t, topt)
    # an optimizer over the same parameters in another order: the state shapes no longer fit
    shuffled = ecoptim.AdamW(list(t.parameters())[::-1], lr=1e-3)
    with pytest.raises(ValueError, match=r"blocks.1.qkv.weight: optimizer state 'exp_avg' has shape "
                                         r"\(32, 64\), expected \(96, 32\)"):
        load_checkpoint(path, t, shuffled)
    assert_same_bits(before, snapshot(t))
    assert not shuffled.state and not sgd.state and not two_groups.state


def _run(model, opt, sched, steps, nan_at=()):
    """Train ``steps`` steps drawing each batch from the global RNG (so resuming needs the RNG state too)."""
    for _ in range(steps):
        idx = torch.randint(0, 64, (4, 17))
        opt.zero_grad()
        lm_loss(model, idx).backward()
        if sched.last_epoch in nan_at:
            model.blocks[0].up.weight.grad[0, 0] = float("nan")
        opt.step()
        sched.step()


def _fresh(seed):
    torch.manual_seed(seed)
    m = ecoptim.quantize_(TinyLM(), "fp8", "row")
    ecoptim.quantize_(m, "int4", "group16", filter_fn=lambda mod, n: n == "lm_head")  # a second format
    opt = ecoptim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1, mode="eco", rounding="stochastic", seed=seed)
    total, warm = 8, 2
    cosine = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(cosine(s), 0.05))
    return m, opt, sched


def test_resume_at_step_k_reproduces_the_uninterrupted_run_exactly(tmp_path):
    total, k, nan_at = 8, 3, (1, 5)  # one skipped (non-finite) step before and one after the checkpoint
    ref, ref_opt, ref_sched = _fresh(0)
    torch.manual_seed(123)
    _run(ref, ref_opt, ref_sched, total, nan_at)
    assert ref_opt.skipped_steps == 2

    a, a_opt, a_sched = _fresh(0)
    torch.manual_seed(123)
    _run(a, a_opt, a_sched, k, nan_at)
    save_checkpoint(tmp_path / "ck.pt", a, a_opt, a_sched, step=k, extra={"note": "stopped"})
    del a, a_opt, a_sched
    torch.manual_seed(999)  # the resumed process starts with other weights, SR seed and global RNG
    b, b_opt, b_sched = _fresh(7)
    info = load_checkpoint(tmp_path / "ck.pt", b, b_opt, b_sched, restore_rng=True)
    assert info["step"] == k and info["extra"] == {"note": "stopped"} and b_opt.skipped_steps == 1
    _run(b, b_opt, b_sched, total - k, nan_at)

    assert_same_bits(snapshot(ref), snapshot(b))
    assert_same_state(ref_opt.state_dict(), b_opt.state_dict())  # moments, steps, SR generators, skipped
    assert_same_state(ref_sched.state_dict(), b_sched.state_dict())
    assert b_opt.skipped_steps == 2
    assert isinstance(b.lm_head.weight, QuantizedTensor) and b.lm_head.weight.codes.dtype == torch.uint8


# -- safetensors -----------------------------------------------------------------------------------------
def mixed_model(seed=0):
    """fp8 / int4 / bf16 quantized weights, a dense head, a tied embedding and a buffer."""
    torch.manual_seed(seed)
    m = TinyLM()
    m.lm_head.weight = m.emb.weight  # tied
    m.register_buffer("positions", torch.arange(5, dtype=torch.int64))
    ecoptim.quantize_(m, "fp8_e4m3", "row", filter_fn=lambda mod, n: n.endswith("qkv") or n.endswith("proj"))
    ecoptim.quantize_(m, "int4", "group16", filter_fn=lambda mod, n: n.endswith("up"))
    ecoptim.quantize_(m, "bf16", filter_fn=lambda mod, n: n.endswith("down"))
    return m


def test_safetensors_round_trip_is_bit_identical(tmp_path):
    m = mixed_model()
    opt = ecoptim.AdamW(m.parameters(), lr=1e-2)
    train(m, opt, batches(2))
    path = export_safetensors(m, tmp_path / "m.safetensors", metadata={"note": "test"})
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]

    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    desc = json.loads(meta["ecoptim"])["entries"]
    assert meta["note"] == "test"
    assert desc["blocks.0.qkv.weight"] | {"codes": None, "scale": None} == {
        "kind": "quantized", "format": "fp8_e4m3", "granularity": "row", "shape": [96, 32], "dtype": "float32",
        "codes": None, "scale": None}
    assert desc["blocks.0.up.weight"]["granularity"] == "group16" and desc["blocks.0.down.weight"]["scale"] is None
    assert stored["blocks.0.qkv.weight.codes"].dtype == torch.float8_e4m3fn
    assert stored["blocks.0.up.weight.codes"].dtype == torch.uint8
    assert stored["blocks.0.up.weight.codes"].numel() == 128 * 32 // 2  # two int4 codes per byte
    assert stored["blocks.0.down.weight.codes"].dtype == torch.bfloat16
    assert "blocks.0.qkv.weight" not in stored  # no dequantized copy
    assert desc["lm_head.weight"]["data"] == {"alias": "emb.weight"} and "lm_head.weight" not in stored

    target = mixed_model(seed=5)
    assert not torch.equal(target.emb.weight, m.emb.weight)
    load_safetensors(target, path)
    assert_same_bits(snapshot(m), snapshot(target))
    assert target.lm_head.weight is target.emb.weight  # still tied


def test_safetensors_refuses_mismatch_corruption_and_foreign_files(tmp_path):
    m = mixed_model()
    path = export_safetensors(m, tmp_path / "m.safetensors")
    other = ecoptim.quantize_(TinyLM(), "fp8")
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"blocks.0.up.weight: format differs: checkpoint int4/group16, "
                                         r"model fp8_e4m3/row"):
        load_safetensors(other, path)
    assert_same_bits(before, snapshot(other))

    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="cut.safetensors.*truncated, corrupt"):
        load_safetensors(mixed_model(), tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-7] ^= 0x01
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="flip.safetensors' is corrupt: checksum mismatch"):
        load_safetensors(mixed_model(), tmp_path / "flip.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no ecoptim format description"):
        load_safetensors(mixed_model(), tmp_path / "plain.safetensors")


def test_missing_safetensors_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        export_safetensors(TinyLM(), tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_non_plain_extra_is_refused_on_load_with_a_hint(tmp_path):
    import fractions

    m = TinyLM(d=16, layers=1)
    save_checkpoint(tmp_path / "ck.pt", m, extra={"ratio": fractions.Fraction(1, 3)})
    with pytest.raises(ValueError, match=r"fractions.Fraction.*keep save_checkpoint's `extra` to plain data"):
        load_checkpoint(tmp_path / "ck.pt", m)
    assert load_checkpoint(tmp_path / "ck.pt", m, weights_only=False)["extra"] == {"ratio": fractions.Fraction(1, 3)}


@pytest.mark.parametrize("writer", ["checkpoint", "safetensors"])
def test_a_full_disk_raises_checkpoint_write_error_naming_path_and_cause(tmp_path, monkeypatch, writer):
    """ENOSPC part way through the write: CheckpointWriteError (an OSError with the errno) names the path and
    the cause; the previous file is unchanged and loads; no temporary file is left."""
    import errno
    from ecoptim.checkpoint import CheckpointWriteError
    pytest.importorskip("safetensors")
    import safetensors.torch
    m = mixed_model()
    path = tmp_path / ("ck.pt" if writer == "checkpoint" else "m.safetensors")
    save = (lambda: save_checkpoint(path, m)) if writer == "checkpoint" else (lambda: export_safetensors(m, path))
    save()
    before = path.read_bytes()
    if writer == "checkpoint":
        real = torch.save

        def half_then_full(obj, f, *a, **k):
            real(obj, f, *a, **k)
            f.truncate(f.tell() // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", half_then_full)
    else:
        def full(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointWriteError, match=rf"could not write '{path}': No space left on device \[errno 28\]"
                       r".*previous file at that path \(if any\) is unchanged; free space") as ei:
        save()
    monkeypatch.undo()
    assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == [path.name]
    if writer == "checkpoint":
        load_checkpoint(path, mixed_model())
    else:
        load_safetensors(mixed_model(), path)


def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path):
    # mkstemp's temp file is 0600; the renamed checkpoint must follow the umask like torch.save's files
    old = os.umask(0o022)
    try:
        path = ecoptim.checkpoint.atomic_write(tmp_path / "x.bin", lambda p: open(p, "wb").write(b"abc"))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
