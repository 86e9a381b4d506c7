"""ZeRO-1 (``torch.distributed.optim.ZeroRedundancyOptimizer``) with quantized weights.

Plain ``ZeroRedundancyOptimizer(params, optimizer_class=ecoptim.AdamW)`` runs but is silently wrong for
quantized weights: each rank updates the parameters it owns (fine: the ecoptim optimizer is built on that
shard, ECO state and SR draws live only there), then ``_broadcast_params_from_rank`` calls
``dist.broadcast(param.data)``. For a ``QuantizedTensor`` that broadcast lands in a dequantized temporary,
so the other ranks never receive the owner's new codes and the replicas drift apart from the first step
(``tests/test_distributed.py::test_zero_quantized`` shows it). ``ZeroRedundancyQuantized`` broadcasts the
raw code and scale bytes of each owned parameter instead (bit-exact, 1 B/param for FP8).

ZeRO's ``parameters_as_bucket_view=True`` re-points ``param.data`` into a flat dense bucket, which a
quantized parameter cannot be, and ``overlap_with_ddp=True`` broadcasts from a DDP hook: both are refused.
For sharding parameters as well as optimizer state use FSDP2 (``ecoptim.distributed.fsdp``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from .ddp import storage_tensors

__all__ = ["ZeroRedundancyQuantized"]


class ZeroRedundancyQuantized(ZeroRedundancyOptimizer):
    """``ZeroRedundancyOptimizer`` whose post-step broadcast ships codes and scales bit for bit."""

    def __init__(self, params: Any, optimizer_class: type, process_group: Any = None, **kwargs: Any) -> None:
        if kwargs.get("parameters_as_bucket_view"):
            raise ValueError("parameters_as_bucket_view=True re-points param.data into a dense bucket, which a "
                             "quantized parameter cannot be; leave it False")
        if kwargs.get("overlap_with_ddp"):
            raise ValueError("overlap_with_ddp=True is not supported with quantized parameters")
        super().__init__(params, optimizer_class, process_group=process_group, **kwargs)

    def _broadcast_params_from_rank(self, rank: int) -> list:
        src = dist.distributed_c10d.get_global_rank(self.process_group, rank)
        handles = []
        for group in self._partition_parameters()[rank]:
            for p in group["params"]:
                for _, t in storage_tensors("", p):
                    handles.append(dist.broadcast(t.reshape(-1).view(torch.uint8), src=src,
                                                  group=self.process_group, async_op=True))
        return handles
