"""The app's evidence machinery: seeds and paired intervals, the LR sweep, --text, --resume, thread independence."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from ecoptim.app import cli
from ecoptim.app.cli import main
from ecoptim.app.corpus import load_split, load_user_text, split_bytes
from ecoptim.app.model import LlamaConfig
from ecoptim.app.stats import mean_interval, mean_sd, paired_interval, student_t_cdf, student_t_quantile
from ecoptim.app.train import METHODS, Corpus, train_run

FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--eval-batches", "1",
        "--threads", "1", "--quiet"]
# fields that measure time, not numerics
TIMING = ("tokens_per_s", "wall_s", "resumed_from")


def _quiet_main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def _numerics(path: Path) -> list[dict]:
    res = json.loads((path / "results.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in res["results"]]


def _small_corpus() -> Corpus:
    return Corpus("shakespeare", load_split("shakespeare", "train")[:20000], load_split("shakespeare", "val")[:5000])


# --- statistics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df, q975", [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105),
                                      (9, 2.262157163), (10, 2.228138852), (30, 2.042272456),
                                      (1000, 1.962339081)])
def test_student_t_quantile_matches_tables(df: int, q975: float) -> None:
    assert student_t_quantile(0.975, df) == pytest.approx(q975, abs=1e-8)
    assert student_t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-8)
    assert student_t_cdf(q975, df) == pytest.approx(0.975, abs=1e-10)


def test_student_t_other_levels_and_errors() -> None:
    assert student_t_quantile(0.995, 5) == pytest.approx(4.032142984, abs=1e-8)
    assert student_t_quantile(0.95, 3) == pytest.approx(2.353363435, abs=1e-8)
    assert student_t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    assert student_t_cdf(0.0, 4) == 0.5
    with pytest.raises(ValueError, match="p must be"):
        student_t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        student_t_quantile(0.9, 0)


def test_paired_interval_is_the_t_interval_of_the_differences() -> None:
    xs, ref = [2.10, 2.05, 2.20, 2.12], [2.00, 2.01, 2.08, 2.03]
    iv = paired_interval(xs, ref)
    d = [a - b for a, b in zip(xs, ref)]
    mean, sd = mean_sd(d)
    half = 3.182446305 * sd / math.sqrt(4)
    assert iv.n == 4 and iv.mean == pytest.approx(mean) and iv.sd == pytest.approx(sd)
    assert iv.lo == pytest.approx(mean - half) and iv.hi == pytest.approx(mean + half)
    assert iv.excludes_zero  # all four differences are clearly positive
    one = mean_interval([1.5])
    assert one.sd is None and one.lo is None and not one.excludes_zero
    with pytest.raises(ValueError, match="length"):
        paired_interval([1.0, 2.0], [1.0])
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)


# --- the user's own text -----------------------------------------------------------------------------------

def test_text_split_is_deterministic_disjoint_and_covers_the_text(tmp_path: Path) -> None:
    text = bytes(range(256)) * 300  # 76,800 bytes: under 512 KiB, so smaller blocks
    (tmp_path / "a.txt").write_bytes(text)
    train, val = split_bytes(load_user_text(tmp_path / "a.txt"))
    train2, val2 = split_bytes(text)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert train.numel() + val.numel() == len(text)
    assert val.numel() >= 4 * (len(text) // 64)  # at least 4 validation blocks
    block = len(text) // 64
    assert torch.equal(val[:block], torch.tensor(list(text[15 * block:16 * block]), dtype=torch.uint8))


def test_text_folder_reads_files_in_sorted_order_whatever_the_creation_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / ".hidden").write_bytes(b"ignored")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert load_user_text(tmp_path) == b"first\nsecond"
    with pytest.raises(ValueError, match="does not exist"):
        load_user_text(tmp_path / "missing")
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="no non-empty files"):
        load_user_text(tmp_path / "void")


def test_compare_on_the_users_text(tmp_path: Path) -> None:
    corpus = tmp_path / "notes"
    corpus.mkdir()
    raw = load_split("milton", "train")[:60000].numpy().tobytes()
    (corpus / "one.txt").write_bytes(raw[:30000])
    (corpus / "two.txt").write_bytes(raw[30000:])
    assert _quiet_main(["compare", *FAST, "--steps", "3", "--methods", "fp32_mw,eco_sr", "--text", str(corpus),
                        "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["config"]["corpus"] == f"text:{corpus}"
    assert sum(res["config"]["data_bytes"].values()) == 60001  # the two files and the newline between them
    assert all(r["status"] == "ok" for r in res["results"])


def test_too_little_text_is_refused_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "tiny.txt").write_bytes(b"to be or not to be" * 10)
    with pytest.raises(SystemExit):
        main(["compare", *FAST, "--text", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "o")])
    assert "give more text or lower --batch-size" in capsys.readouterr().err


# --- seeds -------------------------------------------------------------------------------------------------

def test_seeds_pair_methods_and_intervals_come_from_the_per_seed_differences(tmp_path: Path) -> None:
    assert _quiet_main(["compare", *FAST, "--steps", "4", "--methods", "mw_sr,naive_sr,eco_sr", "--seeds", "0,1,2",
                        "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["seed"], r["method"]): r for r in res["results"]}
    assert len(runs) == 9 and res["config"]["seeds"] == [0, 1, 2]
    for s in (0, 1, 2):  # one seed: the same initial weights for every method
        assert len({runs[s, m]["initial_val_loss"] for m in ("fp8_mw_sr", "fp8_naive_sr", "fp8_eco_sr")}) == 1
    assert len({runs[s, "fp8_mw_sr"]["initial_val_loss"] for s in (0, 1, 2)}) == 3  # seeds differ
    summary = {r["method"]: r for r in res["summary"]}
    naive = summary["fp8_naive_sr"]
    d = [runs[s, "fp8_naive_sr"]["final_val_loss"] - runs[s, "fp8_mw_sr"]["final_val_loss"] for s in (0, 1, 2)]
    iv = paired_interval([runs[s, "fp8_naive_sr"]["final_val_loss"] for s in (0, 1, 2)],
                         [runs[s, "fp8_mw_sr"]["final_val_loss"] for s in (0, 1, 2)])
    assert naive["diff_vs_mw_sr"]["mean"] == pytest.approx(sum(d) / 3)
    assert (naive["diff_vs_mw_sr"]["lo"], naive["diff_vs_mw_sr"]["hi"]) == (iv.lo, iv.hi)
    assert summary["fp8_mw_sr"]["diff_vs_mw_sr"]["mean"] == 0.0
    assert naive["final_val_loss_sd"] is not None and naive["seeds"] == [0, 1, 2]
    md = (tmp_path / "results.md").read_text()
    assert "95%" in md and "Command: `ecoptim compare" in md
    assert res["reproducibility"]["threads"] == [1] and res["reproducibility"]["cpu_capability"]


def test_sweep_over_learning_rates_on_the_tiny_preset(tmp_path: Path) -> None:
    assert _quiet_main(["sweep", *FAST, "--steps", "4", "--lrs", "2e-3,5e-4", "--seeds", "0,1",
                        "--methods", "mw_sr,naive_sr", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["command"] == "sweep" and res["config"]["peak_lrs"] == [2e-3, 5e-4]
    rows = {(r["peak_lr"], r["method"]): r for r in res["summary"]}
    assert set(rows) == {(lr, m) for lr in (2e-3, 5e-4) for m in ("fp8_mw_sr", "fp8_naive_sr")}
    for lr in (2e-3, 5e-4):
        diff = rows[lr, "fp8_naive_sr"]["diff_vs_mw_sr"]
        assert diff["n"] == 2 and diff["lo"] <= diff["mean"] <= diff["hi"]
    assert {r["peak_lr"] for r in res["results"]} == {2e-3, 5e-4}
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "peak lr" in (tmp_path / "results.md").read_text()


# --- interruption ------------------------------------------------------------------------------------------

def test_train_run_resumed_from_a_checkpoint_equals_one_go(tmp_path: Path) -> None:
    kw = dict(cfg=LlamaConfig.preset("tiny"), steps=8, batch_size=2, seq_len=16, lr=2e-3, seed=5,
              data=_small_corpus(), progress=False, eval_every=3, eval_batches_n=1, final_eval_batches_n=2,
              threads=1)
    for name in ("fp32_mw", "fp8_eco_sr", "fp8_naive_sr"):
        whole = train_run(METHODS[name], **kw)
        ckpt = tmp_path / f"{name}.pt"
        assert train_run(METHODS[name], **kw, checkpoint_path=ckpt, checkpoint_every=2, stop_after=5) is None
        assert ckpt.is_file()
        resumed = train_run(METHODS[name], **kw, checkpoint_path=ckpt, checkpoint_every=2)
        assert whole is not None and resumed is not None and resumed.resumed_from == 4
        a, b = whole.to_dict(), resumed.to_dict()
        for k in TIMING:
            a.pop(k), b.pop(k)
        assert a == b, name


def test_resume_of_an_interrupted_compare_gives_the_same_results(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [*FAST, "--steps", "6", "--methods", "fp32_mw,naive_sr,eco_sr", "--seeds", "0,1",
            "--checkpoint-every", "2"]
    assert _quiet_main(["compare", *argv, "--out", str(tmp_path / "whole")]) == 0

    calls = []
    real = cli.train_run

    def interrupted(*args, **kwargs):  # the 5th run (seed 1, naive_sr) is killed after step 5
        calls.append(1)
        if len(calls) == 5:
            real(*args, **kwargs, stop_after=5)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _quiet_main(["compare", *argv, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(cli, "train_run", real)
    state = tmp_path / "cut" / "state"
    assert len(list(state.glob("lr*.json"))) == 4 and len(list(state.glob("*.pt"))) == 1
    assert _quiet_main(["compare", *argv, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert _numerics(tmp_path / "cut") == _numerics(tmp_path / "whole")
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [r["resumed_from"] for r in cut["results"]] == [None, None, None, None, 4, None]
    assert not list(state.glob("*.pt"))


def test_resume_refuses_other_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", *FAST, "--steps", "2", "--methods", "eco_sr", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*argv, "--resume"])
    assert "holds no interrupted run" in capsys.readouterr().err
    assert _quiet_main(argv) == 0
    with pytest.raises(SystemExit):
        main([*argv, "--steps", "3", "--resume"])
    assert "used other options (steps)" in capsys.readouterr().err
    # more seeds: only the new runs train, the finished one is read back
    assert _quiet_main([*argv, "--seeds", "0,1", "--resume"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in res["results"]] == [0, 1]


# --- reproducibility ---------------------------------------------------------------------------------------

def test_losses_do_not_depend_on_the_thread_count() -> None:
    """The bits of a run depend on the CPU's vector ISA and the library versions, not on the thread count (docs:
    experiments.md#reproducibility): 1 and 2 threads give the same losses, dense and quantized."""
    kw = dict(cfg=LlamaConfig.preset("tiny"), steps=6, batch_size=8, seq_len=64, lr=2e-3, seed=1,
              data=_small_corpus(), progress=False, eval_every=3, eval_batches_n=1, final_eval_batches_n=2)
    old = torch.get_num_threads()
    try:
        for name in ("fp32_mw", "fp8_eco_sr"):
            one = train_run(METHODS[name], threads=1, **kw)
            two = train_run(METHODS[name], threads=2, **kw)
            assert one is not None and two is not None
            assert one.val_curve == two.val_curve and one.final_val_loss == two.final_val_loss
            assert one.final_train_loss == two.final_train_loss
    finally:
        torch.set_num_threads(old)
