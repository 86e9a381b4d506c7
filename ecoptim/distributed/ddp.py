"""DistributedDataParallel with quantized weights: bit-exact replicas, checked.

Why a helper and not plain ``DistributedDataParallel(model)``
-----------------------------------------------------------
Plain DDP *does* accept a model whose weights are ``QuantizedTensor`` parameters: the gradients it buckets
and all-reduces are ordinary dense tensors, and its reducer never writes into the parameters. Its one
problem is the start-up broadcast (``_sync_module_states`` -> ``dist._broadcast_coalesced``): that flattens
the parameters with ``torch.cat``, which the ``QuantizedTensor`` dispatch answers by *dequantizing*, so the
weights travel as fp32 (4 B/param instead of 1 for FP8) and every receiver re-quantizes them
(``copy_`` -> ``requantize_`` with round-to-nearest and a recomputed absmax scale). That round trip happens
to reproduce the codes and scales (dequantize -> quantize is idempotent for the built-in formats), but it
is 4x (INT4: 8x) the bytes and rests on that idempotence. ``ddp()`` instead ships every parameter's raw
storage (codes and scales of quantized weights, the data of dense ones, buffers) bit for bit in one
coalesced uint8 broadcast from ``src``, then builds DDP with ``init_sync=False``.

Why replicas stay identical
---------------------------
After the all-reduce every rank holds the same averaged gradient (bit for bit: gloo/NCCL all-reduce
returns one result to every rank). An ecoptim optimizer's update is then deterministic except for
stochastic rounding, whose uniforms come from ``optimizer.generator(device)``, seeded with the optimizer's
``seed``. Same seed on every rank (the default, ``seed=0``) => same draws in the same order => identical
codes, scales and optimizer states after every step. A rank-dependent seed (``seed=rank``) breaks this
silently; ``sync_optimizer_rng_`` makes the streams identical whatever each rank was given, and
``assert_replicas_identical`` detects drift (tests/test_distributed.py checks both ways).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..qtensor import QuantizedTensor

__all__ = ["ddp", "broadcast_module_", "sync_optimizer_rng_", "replica_digests", "assert_replicas_identical",
           "ReplicaDivergenceError", "storage_tensors", "unwrap"]


class ReplicaDivergenceError(AssertionError):
    """Replicas that should be bit-identical are not (names the first differing tensors and ranks)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The user module inside a DDP (or any ``.module``-holding) wrapper."""
    while isinstance(module, DistributedDataParallel):
        module = module.module
    return module


def storage_tensors(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors that hold ``t``'s data: codes (+ scale) of a QuantizedTensor, else ``t`` itself."""
    if isinstance(t, QuantizedTensor):
        out = [(f"{name}.codes", t.codes)]
        if t.scale is not None:
            out.append((f"{name}.scale", t.scale))
        return out
    return [(name, t.detach())]


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("distributed sync needs contiguous parameter storage")
    return t.reshape(-1).view(torch.uint8)


def _module_tensors(module: nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    module = unwrap(module)
    out: list[tuple[str, torch.Tensor]] = []
    for name, p in module.named_parameters():
        out += storage_tensors(name, p)
    if buffers:
        for name, b in module.named_buffers():
            out.append((name, b.detach()))
    return out


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(n, str(t.dtype), tuple(t.shape)) for n, t in tensors]


def _check_same_structure(tensors: list[tuple[str, torch.Tensor]], group: Any, src: int) -> None:
    sig = _signature(tensors)
    sigs: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(sigs, sig, group=group)
    ref = sigs[dist.get_group_rank(group, src) if group is not None else src]
    for r, s in enumerate(sigs):
        if s != ref:
            diff = [f"{a} vs {b}" for a, b in zip(s, ref) if a != b][:3] or [f"{len(s)} vs {len(ref)} tensors"]
            raise ValueError(f"rank {r} holds a different model than rank {src} (storage name, dtype, shape): "
                             + "; ".join(diff) + ". Quantize the model identically on every rank before wrapping it.")


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0, group: Any = None, buffers: bool = True) -> int:
    """Copy ``src``'s parameters (codes and scales for quantized ones) and buffers to every rank, bit for bit.

    One coalesced uint8 broadcast; returns its size in bytes (what went on the wire from ``src``).
    """
    tensors = _module_tensors(module, buffers)
    _check_same_structure(tensors, group, src)
    views = [_bytes_view(t) for _, t in tensors]
    if not views:
        return 0
    flat = torch.cat(views)
    dist.broadcast(flat, src, group=group)
    offset = 0
    for v in views:
        v.copy_(flat[offset:offset + v.numel()])
        offset += v.numel()
    return flat.numel()


def ddp(module: nn.Module, *, src: int = 0, process_group: Any = None, **ddp_kwargs: Any) -> DistributedDataParallel:
    """Wrap a (quantized) model in ``DistributedDataParallel`` after a bit-exact low-bit broadcast from ``src``.

    All other keyword arguments go to ``DistributedDataParallel`` (``init_sync`` is set to False: the
    broadcast done here replaces DDP's fp32 one). Use any ecoptim optimizer on ``module.parameters()``
    with the *same* ``seed`` on every rank (or call ``sync_optimizer_rng_``).
    """
    if "init_sync" in ddp_kwargs:
        raise TypeError("ddp() does its own bit-exact initial sync; do not pass init_sync")
    broadcast_module_(module, src, process_group)
    return DistributedDataParallel(module, init_sync=False, process_group=process_group, **ddp_kwargs)


def sync_optimizer_rng_(optimizer: torch.optim.Optimizer, src: int = 0, group: Any = None) -> None:
    """Give every rank ``src``'s stochastic-rounding seed and generator states (an ecoptim optimizer)."""
    if not hasattr(optimizer, "rng_states"):
        raise TypeError(f"{type(optimizer).__name__} has no ecoptim stochastic-rounding generators")
    payload = [(optimizer.seed, optimizer.rng_states())]
    dist.broadcast_object_list(payload, src=src, group=group)
    seed, states = payload[0]
    optimizer.seed = seed
    optimizer.set_rng_states(states)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(_bytes_view(t.detach().contiguous().cpu()).numpy().tobytes()).hexdigest()[:32]


def replica_digests(module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """SHA-256 of the bytes of everything that must agree across data-parallel replicas.

    Parameters (codes, scales, dense data), buffers, the optimizer's per-parameter state (keyed by the
    parameter's name; keys listed in ``optimizer.per_rank_state`` are skipped, e.g. 1-bit Adam's worker
    error), its stochastic-rounding generator states, and any ``extra`` tensors.
    """
    module = unwrap(module)
    out = {f"model:{n}": _digest(t) for n, t in _module_tensors(module)}
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        per_rank = set(getattr(optimizer, "per_rank_state", ()))
        for p, st in optimizer.state.items():
            pname = names.get(id(p), f"<unnamed {tuple(p.shape)}>")
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k not in per_rank:
                    out[f"optim:{pname}.{k}"] = _digest(v)
        for key, g in getattr(optimizer, "_generators", {}).items():
            out[f"rng:{key}"] = _digest(g.get_state())
    for k, v in (extra or {}).items():
        out[f"extra:{k}"] = _digest(v)
    return out


def assert_replicas_identical(module: nn.Module, optimizer: torch.optim.Optimizer | None = None, group: Any = None,
                              extra: dict[str, torch.Tensor] | None = None) -> int:
    """Raise ``ReplicaDivergenceError`` unless every rank holds bit-identical model/optimizer state.

    A collective: call it on every rank. Returns the number of tensors compared.
    """
    mine = replica_digests(module, optimizer, extra)
    all_digests: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(all_digests, mine, group=group)
    ref = all_digests[0]
    bad: list[str] = []
    for r, d in enumerate(all_digests[1:], start=1):
        keys = sorted(set(ref) | set(d))
        bad += [f"{k} (rank {r})" for k in keys if ref.get(k) != d.get(k)]
    if bad:
        raise ReplicaDivergenceError(f"{len(bad)} tensor(s) differ from rank 0: " + ", ".join(bad[:8])
                                     + (" ..." if len(bad) > 8 else ""))
    return len(ref)


def named_optimizer_states(module: nn.Module, optimizer: torch.optim.Optimizer) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name.state_key, tensor)`` for every tensor of the optimizer state, named by parameter."""
    module = unwrap(module)
    names = {id(p): n for n, p in module.named_parameters()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                yield f"{names.get(id(p), '?')}.{k}", v
