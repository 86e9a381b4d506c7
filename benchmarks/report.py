"""What every benchmark script writes: machine facts, ``<out>/<stem>.json`` and a markdown table."""
from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

import torch


def run_meta(script: str, argv: list[str] | None, threads: int, **extra: Any) -> dict[str, Any]:
    """The machine, torch and the command line that reproduces the run (``extra`` adds the run's settings)."""
    from ecoptim import kernels
    args = argv if argv is not None else sys.argv[1:]
    return dict(torch=torch.__version__, cpus=os.cpu_count(), threads=threads, platform=platform.platform(),
                processor=platform.processor(), kernel_threads=kernels.threading_model(),
                kernel_isa=kernels.vector_isa(), torch_isa=torch.backends.cpu.get_cpu_capability(), **extra,
                command=f"python benchmarks/{script} " + " ".join(args))


def machine_line(meta: dict[str, Any]) -> str:
    """Where a run was measured, as its report's first line starts: the platform, CPUs and threads, how the
    kernels ran (threads, vector instructions; torch's vector instructions beside them), torch's version."""
    return (f"Measured on {meta['platform']} ({meta['cpus']} CPUs, {meta['threads']} threads, kernel threads: "
            f"{meta['kernel_threads']}, kernel vectors: {meta['kernel_isa']}, torch's: {meta['torch_isa']}), "
            f"torch {meta['torch']}")


def write_report(out: str | None, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]],
                 lines: list[str]) -> None:
    """``<out>/<stem>.json`` (meta + rows), ``<out>/<stem>.md`` (``lines``), and the table on stdout (only the
    table if ``out`` is None)."""
    print("\n".join(lines))
    if out is None:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
