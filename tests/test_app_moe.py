"""``ecoptim finetune --arch qwen3-moe`` (the paper's MoE fine-tune in miniature) end to end at a minimal size:
the table and results.json hold every method with a finite loss, paired intervals over seeds, and a memory
report in which the expert stacks, and only they, are INT4."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from ecoptim.app.cli import main  # noqa: E402
from ecoptim.app.corpus import load_split  # noqa: E402
from ecoptim.app.moe import MoeConfig, MoeLM, is_expert_weight  # noqa: E402
from ecoptim.app.train import Corpus, resolve_methods, train_run  # noqa: E402
from ecoptim.convert import is_quantized, quantize_  # noqa: E402

TINY = ["--d-model", "32", "--ffn-hidden", "32", "--n-layers", "2", "--experts", "4", "--top-k", "2",
        "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--threads", "1",
        "--quiet"]
METHODS = ["fp32_mw", "int4_mw_rtn", "int4_mw_sr", "int4_naive_rtn", "int4_naive_sr", "int4_eco_rtn", "int4_eco_sr"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def moe_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every method, two seeds, a few steps of a 0.05M-parameter Qwen3-MoE."""
    out = tmp_path_factory.mktemp("moe")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["finetune", "--arch", "qwen3-moe", *TINY, "--pretrain-steps", "6", "--steps", "4",
                   "--seeds", "0,1", "--out", str(out)])
    assert rc == 0
    return out, buf.getvalue()


def test_every_method_has_a_finite_loss_and_paired_intervals(moe_out: tuple[Path, str]) -> None:
    out, stdout = moe_out
    res = json.loads((out / "results.json").read_text())
    assert res["command"] == "finetune"
    cfg = res["config"]
    assert cfg["model"]["arch"] == "qwen3-moe" and cfg["model"]["num_experts"] == 4
    assert cfg["model"]["vocab_size"] == 256 and cfg["params"] == MoeLM(MoeConfig(**{
        k: v for k, v in cfg["model"].items() if k != "arch"})).num_params()
    assert cfg["format"] == "int4" and cfg["granularity"] == "row" and cfg["seeds"] == [0, 1]
    assert cfg["source"]["pretrain_steps"] == 6 and math.isfinite(cfg["source"]["pretrain_val_loss"])
    assert "--arch qwen3-moe" in res["command_line"] and res["reproducibility"]["threads"] == [1]
    assert [r["method"] for r in res["results"]] == METHODS * 2
    for r in res["results"]:
        assert r["status"] == "ok" and r["steps_done"] == 4 and r["skipped_steps"] == 0
        assert math.isfinite(r["final_val_loss"]) and math.isfinite(r["initial_val_loss"])
        assert [s for s, _ in r["val_curve"]] == [0, 2, 4]
    summary = {s["method"]: s for s in res["summary"]}
    assert list(summary) == METHODS
    for name, s in summary.items():
        assert s["seeds"] == [0, 1] and s["status"] == "ok"
        assert math.isfinite(s["final_val_loss"]) and s["final_val_loss_sd"] is not None
        if name != "fp32_mw":  # paired by seed with the dense row and with INT4 MW + SR, 95% intervals
            for d in (s["diff_vs_fp32_mw"], s["diff_vs_mw_sr"]):
                assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
    assert summary["int4_eco_sr"]["diff_vs_naive"]["n"] == 2
    # the INT4 cast changes the model: every quantized row starts from the same cast, worse than the dense one
    before = {r["method"]: r["initial_val_loss"] for r in res["results"] if r["seed"] == 0}
    assert len({v for k, v in before.items() if k != "fp32_mw"}) == 1
    assert before["int4_eco_sr"] != before["fp32_mw"]
    # the printed table and results.md are those of `finetune`
    assert "Qwen3-MoE (4 experts, top 2)" in stdout and "int4/row" in stdout
    md = (out / "results.md").read_text()
    assert "| int4_eco_sr | INT4 ECO + SR [row] |" in md and "95% Student-t interval" in md
    for name in ("memory_vs_loss.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_memory_report_shows_the_experts_and_only_them_in_int4(moe_out: tuple[Path, str]) -> None:
    res = json.loads((Path(moe_out[0]) / "results.json").read_text())
    q = res["config"]["quantized"]
    assert sorted(q["params"]) == sorted(f"lm.model.layers.{i}.mlp.experts.{n}" for i in range(2)
                                         for n in ("gate_up_proj", "down_proj"))
    assert q["specs"] == ["int4/row[in=-1]"]
    assert any(n.endswith("mlp.gate.weight") for n in q["dense"])       # the router stays dense
    assert any(n.endswith("self_attn.q_proj.weight") for n in q["dense"])
    assert "lm.lm_head.weight" in q["dense"] and "lm.model.embed_tokens.weight" in q["dense"]
    f = q["fraction"]
    assert 0.3 < f < 1.0 and q["numel"] == round(f * res["config"]["params"])
    bpp = {s["method"]: s["bytes_per_param"] for s in res["summary"]}
    steps = bpp["fp32_mw"] - 12.0  # dense fp32 AdamW: 12 B/param, plus a step counter per tensor
    assert 0 <= steps < 0.01
    # experts: 0.5 B of INT4 codes + 8 B of AdamW moments + fp32 row scales (one per E*out row of length `in`:
    # 4 B / 32 elements here); the rest stays fp32 with its 12 B; master weights add 4 B per expert element
    scales = 4 / 32
    for name in ("int4_naive_rtn", "int4_naive_sr", "int4_eco_rtn", "int4_eco_sr"):
        assert bpp[name] == pytest.approx(12 * (1 - f) + (8.5 + scales) * f + steps, rel=1e-9)
    for name in ("int4_mw_rtn", "int4_mw_sr"):
        assert bpp[name] == pytest.approx(12 * (1 - f) + (12.5 + scales) * f + steps, rel=1e-9)


def test_a_resumed_moe_run_ends_as_one_run(tmp_path: Path) -> None:
    """An interrupted run of INT4 experts (ECO + SR: codes, scales, moments and the SR stream) continues from its
    checkpoint to the bits of an uninterrupted run."""
    cfg = MoeConfig(d_model=32, expert_hidden=32, num_experts=4, max_seq_len=16)
    data = Corpus("milton", load_split("milton", "train"), load_split("milton", "val"))
    (eco_sr,) = resolve_methods(["eco_sr"], "int4", "row")
    kw = dict(eval_every=2, eval_batches_n=1, final_eval_batches_n=2, threads=1)
    one = train_run(eco_sr, cfg, 6, 2, 16, 5e-4, 0, data, False, **kw)
    ckpt = tmp_path / "run.pt"
    assert train_run(eco_sr, cfg, 6, 2, 16, 5e-4, 0, data, False, checkpoint_path=ckpt, checkpoint_every=2,
                     stop_after=4, **kw) is None
    resumed = train_run(eco_sr, cfg, 6, 2, 16, 5e-4, 0, data, False, checkpoint_path=ckpt, checkpoint_every=2,
                        keep_state=True, **kw)
    assert one is not None and resumed is not None and resumed.resumed_from == 4
    assert resumed.final_val_loss == one.final_val_loss and resumed.val_curve == one.val_curve
    assert resumed.state_dict is not None


def test_expert_filter_selects_the_fused_stacks() -> None:
    torch.manual_seed(0)
    model = MoeLM(MoeConfig(d_model=32, expert_hidden=32, num_experts=4))
    quantize_(model, "int4", "row", filter_fn=is_expert_weight(model))
    picked = sorted(n for n, p in model.named_parameters() if is_quantized(p))
    assert picked == sorted(f"lm.model.layers.{i}.mlp.experts.{n}" for i in range(2)
                            for n in ("down_proj", "gate_up_proj"))


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "x.pt"], "--arch qwen3-moe pre-trains its own model"),
    (["--save-checkpoint"], "--arch qwen3-moe pre-trains its own model"),
    (["--methods", "fp32_mw,muon_eco_sr"], "runs the AdamW rows only"),
    (["--top-k", "5"], "--top-k must be in [1, --experts=4]"),
    (["--n-heads", "5"], "n_heads 5 must divide d_model 32"),
    (["--granularity", "group64"], "group size 64 does not divide the row length 32"),
])
def test_bad_moe_arguments_exit_with_a_message(argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--arch", "qwen3-moe", *TINY, "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
