"""Faults around checkpoints: preemption signals, a rank that dies (torchrun), a failing disk, damaged files.

Real processes are interrupted at seeded random steps (``tests/fault_worker.py``) and must end with the
same codes, scales, optimizer state and SR generator state, bit for bit (``torch.equal``), as the same
training run uninterrupted in this process. The torchrun cases that repeat a fault already covered at
another point (each torchrun attempt starts new Python processes) run with `python -m pytest -m slow tests`.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ecoptim
from ecoptim.checkpoint import (CheckpointWriteError, CorruptCheckpointError, atomic_temp_glob, load_checkpoint,
                                save_checkpoint, verify_checkpoint)
from ecoptim.resilience import CheckpointManager, PreemptionGuard, preemption_callback

import fault_worker
from conftest import TinyLM, lm_loss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = str(HERE / "fault_worker.py")
# heavier repeats of covered faults: deselected by default (pyproject's addopts), run with `pytest -m slow`
SLOW = pytest.mark.slow
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def _assert_same_state(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == ref.keys(), what
    diff = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not diff, f"{what}: differs from the uninterrupted run in {diff[:5]}"


# ------------------------------------------------------------------------------------------------------
# 1. Preemption: the guard, and a real training process signalled at random steps
# ------------------------------------------------------------------------------------------------------

def test_guard_turns_the_first_signal_into_a_flag_and_the_second_into_an_exit():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested and guard.exit_code == 0 and not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop() and guard.exit_code == 128 + signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # schedulers repeat SIGTERM: still only the flag
        assert guard.requested and guard.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # another watched signal does not override the first
        assert guard.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: stop now, no checkpoint
    assert signal.getsignal(signal.SIGTERM) == before
    with PreemptionGuard([signal.SIGTERM], escalate=[signal.SIGTERM]) as guard:
        guard.request()  # a stop asked for by another rank or a watchdog is not a first signal
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
        with pytest.raises(SystemExit) as ei:
            os.kill(os.getpid(), signal.SIGTERM)
        assert ei.value.code == 128 + signal.SIGTERM
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(ValueError, PreemptionGuard().install)))
    t.start()
    t.join()
    assert "main thread" in str(errors[0].value)


def _run_until(proc: subprocess.Popen, stop_after: int | None, sig: int) -> list[str]:
    """Read the worker's progress; send ``sig`` once it reports step ``stop_after`` (the signal then lands
    in the next step or in a save). Returns the lines it printed."""
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.strip())
        if stop_after is not None and line.strip() == f"step {stop_after}":
            proc.send_signal(sig)
    proc.wait(timeout=120)
    return lines


def test_signal_at_random_steps_saves_exits_and_resumes_bit_identically(tmp_path):
    """SIGTERM, then SIGINT, at seeded random steps of a real ECO AdamW + SR training process (FP8 weights,
    LR scheduler); each time it saves and exits with 128 + signal, the restart resumes from that step, and
    the final state equals the uninterrupted run's bit for bit."""
    steps, every = 24, 5
    rng = random.Random(22)
    stops = sorted(rng.sample(range(2, steps - 2), 2))
    ckpts = tmp_path / "ckpts"
    resumed_from, stopped_at = [], []
    for stop, sig in [(stops[0], signal.SIGTERM), (stops[1], signal.SIGINT), (None, None)]:
        proc = subprocess.Popen([sys.executable, WORKER, "single", "--dir", str(ckpts), "--steps", str(steps),
                                 "--every", str(every)], stdout=subprocess.PIPE, text=True, env=_env())
        lines = _run_until(proc, stop, sig)
        resumed_from.append(int(lines[0].split()[1]))
        if sig is None:
            assert proc.returncode == 0 and lines[-1] == "done", lines
        else:
            assert proc.returncode == 128 + sig, (proc.returncode, lines)
            stopped = int(lines[-1].split()[1])
            # the worker may be a few steps past the line that triggered the signal when it arrives
            assert lines[-1].startswith("preempted") and stop <= stopped < steps, lines
            assert CheckpointManager(ckpts).latest() == CheckpointManager(ckpts).path(stopped)
            stopped_at.append(stopped)
    assert resumed_from == [0] + stopped_at  # each restart went on from the step the signal stopped
    assert not list(ckpts.glob("*.tmp")) and not list(ckpts.glob(".*.tmp"))
    got = torch.load(ckpts / "final.pt", weights_only=True)
    _assert_same_state(got, fault_worker.train_single(None, steps, every), "resumed after SIGTERM and SIGINT")


def test_preemption_callback_asks_the_trainer_to_save_and_stop():
    transformers = pytest.importorskip("transformers")
    from transformers import TrainerControl
    guard = PreemptionGuard()
    cb = preemption_callback(guard)
    assert isinstance(cb, transformers.TrainerCallback)
    control = cb.on_step_end(None, None, TrainerControl())
    assert not control.should_save and not control.should_training_stop
    guard.request()
    control = cb.on_step_end(None, None, TrainerControl())
    assert control.should_save and control.should_training_stop


def test_importing_ecoptim_resilience_does_not_import_transformers():
    code = "import sys, ecoptim, ecoptim.resilience; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), timeout=120)


# ------------------------------------------------------------------------------------------------------
# 3. A full or failing disk; damaged checkpoints
# ------------------------------------------------------------------------------------------------------

def _trained(seed: int = 0, steps: int = 2):
    model, opt, sched = fault_worker.build_single(seed)
    for i in range(steps):
        opt.zero_grad()
        lm_loss(model, fault_worker.batch(i)).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def _write_half_then(err: int):
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # part of the file reached the disk
        raise OSError(err, os.strerror(err))

    return failing_save


@pytest.mark.parametrize("fault", ["enospc_mid_write", "eio_fsync", "eio_rename"])
def test_failing_save_raises_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    model, opt, sched = _trained()
    manager = CheckpointManager(tmp_path, keep=2)
    good = manager.save(2, model, opt, sched)
    before = good.read_bytes()
    opt.zero_grad()
    lm_loss(model, fault_worker.batch(2)).backward()
    opt.step()
    code = errno.ENOSPC if fault == "enospc_mid_write" else errno.EIO
    if fault == "enospc_mid_write":
        monkeypatch.setattr(torch, "save", _write_half_then(code))
    elif fault == "eio_fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    else:
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
    with pytest.raises(CheckpointWriteError) as ei:
        manager.save(3, model, opt, sched)
    monkeypatch.undo()
    msg = str(ei.value)
    assert ei.value.errno == code and str(manager.path(3)) in msg and os.strerror(code) in msg, msg
    assert isinstance(ei.value, OSError)
    assert [p for _, p in manager.checkpoints()] == [good] and good.read_bytes() == before
    assert _no_temp_files(tmp_path), sorted(os.listdir(tmp_path))
    m2, o2, s2 = fault_worker.build_single(seed=5)
    assert manager.load_latest(m2, o2, s2)["step"] == 2


def test_a_real_write_failure_from_the_kernel_is_reported_with_its_cause(tmp_path):
    """No mock: a child process whose file-size limit (RLIMIT_FSIZE) stops the write half way, as a full disk
    would; the kernel's EFBIG must surface, naming the path, and the previous checkpoint must survive."""
    model, _, _ = _trained()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model)
    before = path.read_bytes()
    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(HERE)!r})
import fault_worker
from ecoptim.checkpoint import CheckpointWriteError, save_checkpoint
model, opt, sched = fault_worker.build_single(1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, resource.RLIM_INFINITY))
try:
    save_checkpoint({str(path)!r}, model, opt, sched, step=9)
except CheckpointWriteError as e:
    print(e.errno, e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.stdout.startswith(f"{errno.EFBIG} could not write {str(path)!r}: File too large"), out
    assert path.read_bytes() == before and _no_temp_files(tmp_path)
    assert verify_checkpoint(path)["step"] is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_latest_falls_back_past_a_damaged_newest_checkpoint_and_names_it(tmp_path, damage):
    model, opt, sched = _trained(steps=1)
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, model, opt, sched)
    ref = fault_worker.snapshot(model, opt)
    opt.zero_grad()
    lm_loss(model, fault_worker.batch(1)).backward()
    opt.step()
    newest = manager.save(2, model, opt, sched)
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))
    # what a process SIGKILLed in the middle of a save leaves behind
    stray = tmp_path / atomic_temp_glob("ckpt-00000003.pt").replace("*", "abc123")
    stray.write_bytes(b"partial")
    with pytest.warns(RuntimeWarning, match=f"skipping damaged checkpoint '{newest}'"):
        assert manager.latest() == manager.path(1)
    m2, o2, s2 = fault_worker.build_single(seed=7)
    with pytest.warns(RuntimeWarning, match=str(newest.name)):
        info = manager.load_latest(m2, o2, s2)
    assert info["step"] == 1 and info["path"] == manager.path(1)
    _assert_same_state(fault_worker.snapshot(m2, o2), ref, "fallback checkpoint")
    with pytest.raises(CorruptCheckpointError, match=newest.name):
        load_checkpoint(newest, m2, o2, s2)
    assert manager.stray_temp_files() == [stray]
    manager.save(3, m2, o2, s2)  # a save cleans up the temp files of its own that a killed save left
    assert manager.stray_temp_files() == [] and _no_temp_files(tmp_path)


def test_manager_keeps_the_newest_and_refuses_a_different_model(tmp_path):
    model, opt, sched = _trained(steps=1)
    manager = CheckpointManager(tmp_path, keep=2, prefix="run")
    for s in (1, 2, 3):
        manager.save(s, model, opt, sched)
    assert [s for s, _ in manager.checkpoints()] == [2, 3]
    other = TinyLM()
    ecoptim.quantize_(other, "int4", "row")
    with pytest.raises(ValueError, match="format differs") as ei:  # a mismatch is not "damaged": no fallback
        manager.load_latest(other)
    assert not isinstance(ei.value, CorruptCheckpointError)
    assert CheckpointManager(tmp_path / "fresh").load_latest(model) is None
    with pytest.raises(ValueError, match="keep must be a positive int"):
        CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="prefix"):
        CheckpointManager(tmp_path, prefix="a/b")


# ------------------------------------------------------------------------------------------------------
# 2. Distributed checkpoints: completion marker; a rank SIGKILLed under torchrun --max-restarts
# ------------------------------------------------------------------------------------------------------

def _single_process_dcp(path: Path) -> torch.nn.Module:
    from ecoptim.distributed.checkpoint import save_checkpoint as dsave
    model, opt, _ = _trained(steps=1)
    with pytest.warns(UserWarning):  # DCP without a process group
        dsave(str(path), model, opt, step=1)
    return model


@needs_gloo
def test_a_half_written_distributed_checkpoint_is_never_taken_as_complete(tmp_path):
    from ecoptim.distributed.checkpoint import (COMPLETE_MARKER, DistributedCheckpointManager,
                                                IncompleteCheckpointError, load_checkpoint as dload)
    manager = DistributedCheckpointManager(tmp_path)
    _single_process_dcp(manager.path(3))
    _single_process_dcp(manager.path(6))
    _single_process_dcp(manager.path(9))
    assert manager.latest() == (9, manager.path(9))
    (manager.path(9) / COMPLETE_MARKER).unlink()  # the save of step 9 died before its marker
    shard = next(manager.path(6).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # step 6's data was cut short after the save
    with pytest.warns(RuntimeWarning) as warned:
        assert manager.latest() == (3, manager.path(3))
    text = " ".join(str(w.message) for w in warned)
    assert "step-00000009' is incomplete: it has no .ecoptim-complete marker" in text
    assert f"its file {shard.name!r} has 100 bytes" in text
    model, opt, _ = fault_worker.build_single(seed=3)
    before = fault_worker.snapshot(model, opt)
    with pytest.raises(IncompleteCheckpointError, match="save never finished"):
        dload(str(manager.path(9)), model, opt)
    _assert_same_state(fault_worker.snapshot(model, opt), before, "a refused load must change nothing")


def _torchrun(kind: str, root: Path, steps: int, every: int, kill: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "3", "--monitor-interval", "0.1", WORKER, "dist", "--kind", kind, "--root", str(root),
           "--steps", str(steps), "--every", str(every), "--kill", kill]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    return [torch.load(root / f"final-rank{r}.pt", weights_only=True) for r in range(2)]


_REFERENCE: dict[tuple, list[dict]] = {}


def _reference(kind: str, steps: int, every: int) -> list[dict]:
    from ecoptim.distributed import run_workers
    key = (kind, steps, every)
    if key not in _REFERENCE:
        _REFERENCE[key] = run_workers(fault_worker.train_dist, 2, (kind, None, steps, every), timeout=300)
    return _REFERENCE[key]


def _check_elastic(tmp_path: Path, kind: str, rank: int, where: str, steps: int = 10, every: int = 3) -> None:
    rng = random.Random(f"{kind}-{where}-{rank}")
    if where == "step":
        kill_step = rng.randrange(2, steps)
    else:
        kill_step = every * rng.randrange(1, (steps - 1) // every + 1)
    got = _torchrun(kind, tmp_path, steps, every, f"{rank}:{kill_step}:{where}")
    ref = _reference(kind, steps, every)
    # the restart resumed from the last *complete* checkpoint: the one before the kill (a save that died
    # at the kill step is skipped). torchrun may need more than one restart: the re-rendezvous of gloo
    # sometimes fails once ("connectFullMesh ... Connection refused") and is retried as another restart.
    last_complete = every * ((kill_step - 1) // every)
    for r in range(2):
        restart, start = got[r]["restart"], got[r]["start"]
        assert restart >= 1, restart
        # the first restart resumes from the last complete checkpoint; a later restart (after a failed gloo
        # re-rendezvous) may resume from a checkpoint the earlier restart completed, never a half-written one
        assert start == last_complete if restart == 1 else (start >= last_complete and start % every == 0), (
            restart, start, last_complete)
        _assert_same_state(got[r]["state"], ref[r]["state"], f"{kind} rank {r} after a SIGKILL at {where} "
                                                              f"{kill_step}")


@needs_gloo
def test_ddp_eco_sr_rank_killed_mid_checkpoint_save_resumes_bit_identically(tmp_path):
    """DDP (FP8 + INT4 weights, ECO AdamW + SR, EControl error feedback): rank 1 SIGKILLs itself after writing
    its shard of a checkpoint, before the collective save completes; torchrun restarts both ranks, which
    skip that half-written checkpoint and end equal to the uninterrupted run."""
    _check_elastic(tmp_path, "ddp", rank=1, where="save")


@needs_gloo
def test_fsdp2_rank0_killed_before_the_completion_marker_resumes_bit_identically(tmp_path):
    """FSDP2 (FP8 row-sharded weights, sharded ECO AdamW + SR): rank 0 dies after every rank wrote the
    checkpoint (DCP's .metadata included) but before the completion marker: that checkpoint must not be
    used; the restart resumes from the one before and ends equal to the uninterrupted run."""
    _check_elastic(tmp_path, "fsdp", rank=0, where="marker")


@SLOW
@needs_gloo
@pytest.mark.parametrize("kind,rank,where", [("ddp", 0, "step"), ("ddp", 0, "marker"), ("fsdp", 1, "step"),
                                             ("fsdp", 1, "save")])
def test_rank_killed_at_other_points_resumes_bit_identically(tmp_path, kind, rank, where):
    _check_elastic(tmp_path, kind, rank, where)


def _should_stop_worker(rank: int, world_size: int) -> list[bool]:
    guard = PreemptionGuard()
    first = guard.should_stop()
    if rank == 1:
        guard.request()  # only rank 1 got the signal
    return [first, guard.should_stop(), guard.requested]


@needs_gloo
def test_should_stop_is_collective_so_every_rank_stops_after_the_same_step():
    from ecoptim.distributed import run_workers
    assert run_workers(_should_stop_worker, 2) == [[False, True, True], [False, True, True]]


@needs_gloo
def test_saving_over_a_checkpoint_invalidates_it_first_and_the_manager_prunes(tmp_path, monkeypatch):
    import ecoptim.distributed.checkpoint as dckpt
    manager = dckpt.DistributedCheckpointManager(tmp_path, keep=2)
    _single_process_dcp(manager.path(3))
    # a save over step 3 that dies before its marker: the old complete checkpoint there is gone, not mixed
    monkeypatch.setattr(dckpt, "write_completion_marker", lambda *a, **k: (_ for _ in ()).throw(OSError("died")))
    with pytest.raises(OSError, match="died"):
        _single_process_dcp(manager.path(3))
    monkeypatch.undo()
    with pytest.raises(dckpt.IncompleteCheckpointError, match="no .ecoptim-complete marker"):
        dckpt.check_complete(manager.path(3))
    model, opt, _ = _trained(steps=1)
    for step in (4, 5, 6):
        with pytest.warns(UserWarning):
            manager.save(step, model, opt)
    # keep=2 complete ones; the incomplete step 3 is older than a complete checkpoint: removed
    assert [s for s, _ in manager.checkpoints()] == [5, 6]
    m2, o2, _ = fault_worker.build_single(seed=4)
    with pytest.warns(UserWarning):
        assert manager.load_latest(m2, o2) == 6
    _assert_same_state(fault_worker.snapshot(m2, o2), fault_worker.snapshot(model, opt), "DCP round trip")
