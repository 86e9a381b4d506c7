"""The command line (compare / finetune) end to end on the tiny preset, plus train.py's building blocks."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecoptim.app.cli import load_dense_model, main, save_dense_model
from ecoptim.app.corpus import load_split
from ecoptim.app.model import LlamaConfig
from ecoptim.app.train import METHODS, Corpus, default_threads, lr_lambda, resolve_methods, train_run, usable_cores

FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "1",
        "--threads", "1", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compare_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny compare run (with a saved checkpoint) shared by several tests."""
    out = tmp_path_factory.mktemp("compare")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compare", *FAST, "--steps", "6", "--methods", "fp32_mw,fp8_naive_rtn,fp8_eco_sr",
                   "--out", str(out), "--save-checkpoint"])
    assert rc == 0
    return out, buf.getvalue()


def test_compare_writes_results(compare_out: tuple[Path, str]) -> None:
    out, stdout = compare_out
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == "compare"
    assert res["config"]["steps"] == 6 and res["config"]["model"]["d_model"] == 64
    assert {"torch", "cpu_count", "platform"} <= set(res["machine"])
    runs = {r["method"]: r for r in res["results"]}
    assert list(runs) == ["fp32_mw", "fp8_naive_rtn", "fp8_eco_sr"]
    for r in runs.values():
        assert r["status"] == "ok" and r["steps_done"] == 6
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < r["initial_val_loss"]
        assert [s for s, _ in r["val_curve"]] == [0, 3, 6]
        assert r["tokens_per_s"] > 0 and r["skipped_steps"] == 0
    # measured static memory: dense fp32 AdamW is 12 B/param; FP8 block weights bring it below 12
    assert runs["fp32_mw"]["bytes_per_param"] == pytest.approx(12.0, abs=0.01)
    assert runs["fp8_eco_sr"]["bytes_per_param"] < 11.0
    assert runs["fp8_eco_sr"]["format"] == "fp8_e4m3" and runs["fp8_eco_sr"]["granularity"] == "row"
    summary = {s["method"]: s for s in res["summary"]}
    assert summary["fp32_mw"]["gap_vs_fp32_mw_pct"] == 0.0
    assert summary["fp8_eco_sr"]["gap_vs_mw_sr_pct"] is None  # no MW+SR row in this run
    # same seed => the same initial weights and eval batches for the two FP8 rows
    assert runs["fp8_naive_rtn"]["initial_val_loss"] == runs["fp8_eco_sr"]["initial_val_loss"]
    for name in ("memory_vs_loss.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "| fp8_eco_sr |" in (out / "results.md").read_text()
    assert "gap vs fp32 MW" in stdout and "fp8_naive_rtn" in stdout and "B/param" in stdout
    assert (out / "checkpoint.pt").is_file()


def test_finetune_from_checkpoint(compare_out: tuple[Path, str], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = compare_out
    rc = main(["finetune", "--checkpoint", str(out / "checkpoint.pt"), "--steps", "4", "--batch-size", "4",
               "--seq-len", "32", "--eval-every", "2", "--eval-batches", "1", "--threads", "1", "--quiet",
               "--granularity", "group64", "--methods", "fp32_mw,mw_sr,eco_sr", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    names = [r["method"] for r in res["results"]]
    assert names == ["fp32_mw", "int4_mw_sr", "int4_eco_sr"]
    assert all(r["granularity"] == "group64" and r["format"] == "int4" for r in res["results"][1:])
    assert res["config"]["corpus"] == "milton"
    for r in res["results"]:
        assert r["initial_val_loss"] is not None and r["final_val_loss"] is not None
    assert (tmp_path / "loss_curves.png").is_file()
    stdout = capsys.readouterr().out
    assert "val before" in stdout and "int4_eco_sr" in stdout


def test_finetune_with_pretraining(tmp_path: Path) -> None:
    rc = main(["finetune", *FAST, "--pretrain-steps", "3", "--steps", "3", "--methods", "fp32_mw,eco_rtn",
               "--out", str(tmp_path), "--save-checkpoint"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["source"]["pretrain_steps"] == 3
    assert [r["method"] for r in res["results"]] == ["fp32_mw", "int4_eco_rtn"]
    assert res["results"][1]["granularity"] == "tensor"  # the paper's INT4 setting by default
    assert (tmp_path / "pretrained.pt").is_file()


def test_dense_model_files_round_trip_and_are_told_apart_from_ecoptim_checkpoints(tmp_path: Path) -> None:
    import ecoptim
    from ecoptim.app.model import LlamaLM

    cfg = LlamaConfig.preset("tiny")
    torch.manual_seed(0)
    model = LlamaLM(cfg)
    save_dense_model(tmp_path / "dense.pt", cfg, model.state_dict(), {"steps": 3})
    cfg2, state, meta = load_dense_model(tmp_path / "dense.pt")
    assert cfg2 == cfg and meta == {"steps": 3}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ecoptim.save_checkpoint(tmp_path / "ecoptim.pt", model)
    with pytest.raises(ValueError, match="not a dense model file .* read by ecoptim.load_checkpoint"):
        load_dense_model(tmp_path / "ecoptim.pt")


@pytest.mark.parametrize("argv, message", [
    (["compare", "--methods", "fp8_eco_xx"], "unknown method"),
    (["compare", "--steps", "0"], "positive integer"),
    (["compare", "--lr", "-1"], "positive number"),
    (["compare", "--format", "fp4"], "invalid choice"),
    (["compare", "--preset", "tiny", "--granularity", "group48"], "group size 48"),
    (["compare", "--methods", "int4_eco_sr", "--format", "fp8_e4m3"], "format"),
    (["compare", "--methods", "fp8_eco_sr", "--save-checkpoint"], "fp32_mw"),
    (["compare", "--preset", "tiny", "--seq-len", "100", "--max-seq-len", "64"], "max-seq-len"),
    (["finetune", "--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
    (["finetune", "--checkpoint", "x.pt", "--pretrain-steps", "3"], "not allowed with"),
    ([], "required"),
])
def test_bad_arguments_exit_with_a_message(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resolve_methods_retargets_the_paper_rows() -> None:
    assert list(METHODS) == ["fp32_mw", "fp8_mw_rtn", "fp8_mw_sr", "fp8_naive_rtn", "fp8_naive_sr", "fp8_eco_rtn",
                             "fp8_eco_sr"]
    eco = METHODS["fp8_eco_sr"]
    assert (eco.format, eco.granularity, eco.mode, eco.rounding) == ("fp8_e4m3", "row", "eco", "stochastic")
    assert METHODS["fp32_mw"].dense
    int4 = resolve_methods(list(METHODS), "int4")
    assert [m.name for m in int4][1:] == [n.replace("fp8", "int4") for n in list(METHODS)[1:]]
    assert {m.granularity for m in int4[1:]} == {"tensor"}
    assert resolve_methods(["eco_sr"], "int4", 128)[0].granularity == "group128"
    assert resolve_methods(["int4_naive_sr"])[0].format == "int4"  # format inferred from the name
    with pytest.raises(ValueError, match="twice"):
        resolve_methods(["eco_sr", "fp8_eco_sr"])


def test_lr_schedule() -> None:
    f = lr_lambda(100)
    assert f(0) == pytest.approx(0.01) and f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.505)
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_divergence_is_recorded_not_raised() -> None:
    data = Corpus("shakespeare", load_split("shakespeare", "train")[:20000], load_split("shakespeare", "val")[:5000])
    r = train_run(METHODS["fp8_naive_rtn"], LlamaConfig.preset("tiny"), steps=30, batch_size=4, seq_len=32,
                  lr=50.0, seed=0, data=data, progress=False, eval_every=10, eval_batches_n=1,
                  final_eval_batches_n=1, threads=1)
    assert r.status == "diverged" and r.diverged_at is not None and r.steps_done < 30


@pytest.mark.parametrize("package", ["ecoptim", "ecoptim.app"])
def test_python_dash_m_entry_point(package: str) -> None:
    proc = subprocess.run([sys.executable, "-m", package, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ecoptim" in proc.stdout


def test_same_seed_same_run() -> None:
    data = Corpus("shakespeare", load_split("shakespeare", "train")[:20000], load_split("shakespeare", "val")[:5000])
    kw = dict(cfg=LlamaConfig.preset("tiny"), steps=3, batch_size=2, seq_len=16, lr=1e-3, seed=3, data=data,
              progress=False, eval_every=10, eval_batches_n=1, final_eval_batches_n=1, threads=1)
    a = train_run(METHODS["fp8_eco_sr"], **kw)
    b = train_run(METHODS["fp8_eco_sr"], **kw)
    assert a.final_val_loss == b.final_val_loss and a.final_train_loss == b.final_train_loss
    assert a.threads == 1 and torch.get_num_threads() == 1
    assert 1 <= default_threads() <= usable_cores()


def test_bf16_and_8bit_optimizer_states_save_measured_bytes_per_quantized_param(tmp_path: Path) -> None:
    """--state-dtype bf16: measured memory drops by 4 B per quantized weight; 8bit: by 8 - 2 B minus the block
    absmax (2 x 4 B per 256 elements) and the stream counter; dense rows keep fp32 states."""
    res = {}
    for dt in ("fp32", "bf16", "8bit"):
        rc = main(["compare", *FAST, "--steps", "3", "--methods", "fp32_mw,fp8_eco_sr", "--state-dtype", dt,
                   "--out", str(tmp_path / dt)])
        assert rc == 0
        data = json.loads((tmp_path / dt / "results.json").read_text())
        assert data["config"]["state_dtype"] == dt
        res[dt] = {r["method"]: r for r in data["results"]}
    assert res["bf16"]["fp32_mw"]["bytes_per_param"] == res["fp32"]["fp32_mw"]["bytes_per_param"]
    eco32, eco16 = res["fp32"]["fp8_eco_sr"], res["bf16"]["fp8_eco_sr"]
    assert eco32["total_bytes"] - eco16["total_bytes"] > 0
    model = LlamaConfig.preset("tiny")
    from ecoptim.app.model import LlamaLM, is_block_linear
    n_quantized = sum(m.weight.numel() for n, m in LlamaLM(model).named_modules() if is_block_linear(m, n))
    assert eco32["total_bytes"] - eco16["total_bytes"] == 4 * n_quantized
    assert math.isfinite(eco16["final_val_loss"])
    eco8 = res["8bit"]["fp8_eco_sr"]
    shapes = [m.weight.numel() for n, m in LlamaLM(model).named_modules() if is_block_linear(m, n)]
    assert eco32["total_bytes"] - eco8["total_bytes"] == sum(6 * k - 8 * -(-k // 256) - 8 for k in shapes)
    assert math.isfinite(eco8["final_val_loss"]) and res["8bit"]["fp32_mw"]["bytes_per_param"] == \
        res["fp32"]["fp32_mw"]["bytes_per_param"]
