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
                processor=platform.processor(), kernel_threads=kernels.threading_model(), **extra,
                command=f"python benchmarks/{script} " + " ".join(args))


def write_report(out: str, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> None:
    """``<out>/<stem>.json`` (meta + rows), ``<out>/<stem>.md`` (``lines``), and the table on stdout."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
