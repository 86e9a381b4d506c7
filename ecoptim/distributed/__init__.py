"""ecoptim on several processes (CPU/gloo tested; nothing here is CPU-specific).

DDP       ddp(model, ...)                    DistributedDataParallel after a bit-exact low-bit broadcast
          sync_optimizer_rng_(opt)           same stochastic-rounding stream on every rank
          assert_replicas_identical(...)     raise if replicas' codes/scales/optimizer state differ
hooks     register_ef_hook(ddp_model, "ef21", TopK(0.01))   error-feedback gradient compression
          (methods none | ef14 | ef21 | econtrol; compressors TopK, ScaledSign, Identity; byte counters)
FSDP2     fully_shard_quantized(model, model.blocks)   low-bit shards and all-gathers (FSDPQuantizedTensor)
          FSDPAdamW / FSDPSGD / sharded_optimizer(cls) ecoptim updates on each rank's shard
ZeRO-1    ZeroRedundancyQuantized(params, optimizer_class=AdamW, ...)   bit-exact code/scale broadcasts
1-bit     OneBitAdamW(..., warmup_steps) + model.register_comm_hook(opt, onebit_hook)
DCP       save_checkpoint / load_checkpoint           torch.distributed.checkpoint, resharding-capable
tools     run_workers(fn, world_size)                 run fn on N local processes, return their results
          init_from_torchrun("gloo")                  init_process_group that survives torchrun restarts
"""
from .ddp import (ReplicaDivergenceError, assert_replicas_identical, broadcast_module_, ddp, replica_digests,
                  sync_optimizer_rng_, unwrap)
from .launch import WorkerTimeout, init_from_torchrun, run_workers
from .fsdp import (FSDPAdamW, FSDPQuantizedTensor, FSDPSGD, check_shardable, fully_shard_quantized, gather_full,
                   local_shard, sharded_optimizer, to_fsdp_quantized_)
from .checkpoint import checkpoint_tensors, load_checkpoint, save_checkpoint
from .onebit import OneBitAdamW, onebit_hook
from .compression import (EF_METHODS, Compressor, ErrorFeedbackState, Identity, ScaledSign, TopK, allreduce_hook,
                          ef_hook, register_ef_hook, wire_bytes)

__all__ = ["ddp", "broadcast_module_", "sync_optimizer_rng_", "replica_digests", "assert_replicas_identical",
           "ReplicaDivergenceError", "unwrap", "run_workers", "WorkerTimeout", "init_from_torchrun",
           "Compressor", "TopK", "ScaledSign", "Identity", "ErrorFeedbackState", "ef_hook", "allreduce_hook",
           "register_ef_hook", "EF_METHODS", "wire_bytes",
           "FSDPQuantizedTensor", "fully_shard_quantized", "to_fsdp_quantized_", "sharded_optimizer", "FSDPAdamW",
           "FSDPSGD", "gather_full", "local_shard", "check_shardable",
           "save_checkpoint", "load_checkpoint", "checkpoint_tensors", "OneBitAdamW", "onebit_hook",
           "ZeroRedundancyQuantized"]


def __getattr__(name: str):  # torch.distributed.optim (ZeRO) is imported only when asked for
    if name == "ZeroRedundancyQuantized":
        from .zero import ZeroRedundancyQuantized
        return ZeroRedundancyQuantized
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
