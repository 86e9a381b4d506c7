"""Surviving preemption and bad disks: a SIGTERM/SIGINT guard and a directory of rotating checkpoints.

    guard = PreemptionGuard()                      # SIGTERM / SIGINT now only set guard.requested
    manager = CheckpointManager("ckpts", keep=3)
    with guard:
        info = manager.load_latest(model, opt, sched, restore_rng=True)   # None on a fresh start
        step = 0 if info is None else info["step"]
        while step < total_steps:
            train_one_step(step)                   # a signal arriving here lets the step finish
            step += 1
            if step % every == 0 or guard.should_stop():
                manager.save(step, model, opt, sched)
            if guard.should_stop():
                sys.exit(guard.exit_code)          # 128 + signal number: "stopped by that signal"

Why the loop decides and the handler only records: a signal lands at an arbitrary bytecode, possibly in
the middle of an optimizer step that has written half of the weights' codes. Saving from inside the
handler would checkpoint that torn state; raising from it would abandon the step at an arbitrary point.
The handler therefore only sets a flag, and the loop checks it between steps, where the model, optimizer,
scheduler and generators are consistent, so the checkpoint it writes resumes bit-identically to a run that
was never interrupted. A second SIGINT means the user at the terminal insists: the guard steps aside and
raises ``KeyboardInterrupt`` without saving. A repeated SIGTERM does not escalate: schedulers deliver it
more than once (SLURM signals every process of the job step, and torchrun forwards the same signal to its
workers again), and the hard stop after the grace period is SIGKILL anyway.

``should_stop()`` is collective under ``torch.distributed``: a scheduler may signal the ranks at slightly
different moments, and ranks that disagreed about which step is the last would wait forever on each
other's all-reduce. It all-reduces the flag (max) so that every rank stops after the same step.

``CheckpointManager`` keeps the ``keep`` newest checkpoints ``<prefix>-<step>.pt`` of a directory, each
written atomically by ``ecoptim.save_checkpoint``. ``latest()`` / ``load_latest()`` take the newest one that
passes its checksums and fall back to older ones, warning with the name of every damaged file skipped. It
removes the temporary files that a process killed mid-save left behind (``.<prefix>-*.pt.*.tmp``), and
only those. One process writes to a directory (rank 0 under DDP); the distributed checkpoints of
``ecoptim.distributed.checkpoint`` have their own completion marker and ``latest_checkpoint``.

``preemption_callback()`` builds a ``transformers.TrainerCallback`` that asks the Trainer to save a
checkpoint and stop when a signal arrived; transformers is imported only when it is called.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (CorruptCheckpointError, atomic_temp_glob, load_checkpoint, numbered_checkpoints,
                         save_checkpoint, verify_checkpoint)

__all__ = ["PreemptionGuard", "CheckpointManager", "preemption_callback"]


class PreemptionGuard:
    """Turn SIGTERM / SIGINT into a flag that a training loop checks between steps (see the module doc).

    Use as a context manager (``with PreemptionGuard() as guard:``) or with ``install()`` / ``uninstall()``;
    the previous handlers are restored on exit. Signal handlers can only be installed from the main thread.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
                 escalate: Iterable[int] = (signal.SIGINT,)) -> None:
        """``signals``: the signals that request a stop. ``escalate``: those of them whose second arrival
        stops at once without a checkpoint (SIGINT: ``KeyboardInterrupt``; others: exit 128 + signal)."""
        self.signals = tuple(signal.Signals(s) for s in signals)
        if not self.signals:
            raise ValueError("PreemptionGuard needs at least one signal to watch, e.g. signal.SIGTERM")
        self.escalate = frozenset(signal.Signals(s) for s in escalate)
        self.signum: int | None = None
        self._received: set[int] = set()  # signals this process's handler saw (not request() / other ranks)
        self._previous: dict[signal.Signals, Any] = {}

    # -- state ---------------------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """True once a watched signal arrived in this process (or ``request()`` was called)."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The conventional status of a process stopped by the received signal: 128 + its number (0 if none)."""
        return 0 if self.signum is None else 128 + int(self.signum)

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to stop as if ``signum`` had arrived (from a watchdog, a time limit, a test)."""
        if self.signum is None:
            self.signum = int(signum)

    def should_stop(self, group: Any = None) -> bool:
        """Whether the loop should save and stop after the current step.

        Under an initialised ``torch.distributed`` process group this is a collective (every rank must call
        it at the same step): True on every rank as soon as any rank received a signal.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and self.signum is None:
            self.signum = int(signal.SIGTERM)  # another rank was signalled: stop the same way
        return bool(flag.item())

    # -- handlers ------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum in self._received and signum in self.escalate:
            # The same signal again: the user insists. Stop now, without a checkpoint.
            self.uninstall()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self._received.add(signum)
        if self.signum is None:
            self.signum = signum

    def install(self) -> "PreemptionGuard":
        """Install the handlers (idempotent). Returns ``self``."""
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("PreemptionGuard must be installed from the main thread (Python delivers signals "
                             "only there); create it in the training script's main thread")
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before ``install()``."""
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


_STEP_DIGITS = 8


class CheckpointManager:
    """The ``keep`` newest checkpoints of one training run in ``directory``, as ``<prefix>-<step>.pt``.

    Every save is atomic (``ecoptim.save_checkpoint``: temp file, fsync, rename); a failed save raises
    ``ecoptim.checkpoint.CheckpointWriteError`` and leaves the existing checkpoints as they were.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, prefix: str = "ckpt") -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int (checkpoints to keep), got {keep!r}; keep >= 2 leaves "
                             "an older checkpoint to fall back to if the newest is damaged")
        if not prefix or any(c in prefix for c in "/\\*?[]") or prefix.startswith("."):
            raise ValueError(f"prefix {prefix!r} must be a plain file name part (no path separator, wildcard or "
                             "leading dot)")
        self.directory = Path(directory)
        self.keep = keep
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.pt")
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or would be) written."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return self.directory / f"{self.prefix}-{step:0{_STEP_DIGITS}d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every checkpoint in the directory, oldest first (not validated)."""
        return numbered_checkpoints(self.directory, self._pattern, directories=False)

    def stray_temp_files(self) -> list[Path]:
        """Temporary files of this manager's checkpoints that a process killed mid-save left behind."""
        return sorted(self.directory.glob(atomic_temp_glob(f"{self.prefix}-*.pt")))

    def remove_stray_temp_files(self) -> list[Path]:
        """Delete ``stray_temp_files()`` (call it only while no other process saves into the directory)."""
        removed = []
        for p in self.stray_temp_files():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
        return removed

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, extra: Any = None) -> Path:
        """Write the checkpoint of ``step`` atomically, then delete all but the ``keep`` newest ones."""
        path = self.path(step)
        self.remove_stray_temp_files()
        save_checkpoint(path, model, optimizer, scheduler, step=step, extra=extra)
        for _, old in self.checkpoints()[:-self.keep]:
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def _warn_skipped(self, path: Path, err: Exception) -> None:
        warnings.warn(f"skipping damaged checkpoint {str(path)!r} and falling back to an older one: {err}",
                      RuntimeWarning, stacklevel=3)

    def latest(self) -> Path | None:
        """The newest checkpoint that reads back and passes its checksums (None if there is none).

        Damaged newer ones are skipped with a ``RuntimeWarning`` naming each file.
        """
        for _, path in reversed(self.checkpoints()):
            try:
                verify_checkpoint(path)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                self._warn_skipped(path, e)
                continue
            return path
        return None

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    **load_kwargs: Any) -> dict[str, Any] | None:
        """Load the newest intact checkpoint into the given objects (``ecoptim.load_checkpoint``).

        Returns its ``{"step", "extra", "rng_state", "path"}``, or None when the directory holds no intact
        checkpoint (a fresh start). Damaged checkpoints are skipped with a ``RuntimeWarning`` naming the
        file; an intact checkpoint that does not match the model raises ``ValueError`` (falling back would
        not help: that is a different model, not a damaged file).
        """
        for _, path in reversed(self.checkpoints()):
            try:
                info = load_checkpoint(path, model, optimizer, scheduler, **load_kwargs)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                self._warn_skipped(path, e)
                continue
            info["path"] = path
            return info
        return None


def preemption_callback(guard: PreemptionGuard | None = None) -> Any:
    """A ``transformers.TrainerCallback`` that makes the Trainer save a checkpoint and stop after the step
    during which SIGTERM / SIGINT arrived (resume with ``trainer.train(resume_from_checkpoint=True)``).

    ``guard``: the ``PreemptionGuard`` to consult (default: a new one, installed now and uninstalled when
    training ends). Under ``torch.distributed`` every rank must use the callback (``should_stop`` is a
    collective). The checkpoint is the Trainer's own: with transformers 5.24 its ``save_pretrained`` cannot
    save a model holding ecoptim quantized weights (docs/guides/fault-tolerance.md).
    """
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError("preemption_callback needs the 'transformers' package: pip install transformers") from e

    class PreemptionCallback(TrainerCallback):
        """Save and stop the Trainer once the guard saw SIGTERM / SIGINT."""

        def __init__(self, guard: PreemptionGuard | None) -> None:
            self.owns_guard = guard is None
            self.guard = PreemptionGuard().install() if guard is None else guard

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.guard.should_stop():
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.owns_guard:
                self.guard.uninstall()
            return control

    return PreemptionCallback(guard)
