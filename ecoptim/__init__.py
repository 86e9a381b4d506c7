"""ecoptim: train models whose weights are stored quantized, with no full-precision master copy.

Public API (reference: the docs site, ``docs/``, one page per module):
    formats:     FP8_E4M3, FP8_E5M2, BF16, FP16, FP32, INT8, INT4 (``ecoptim.formats``);
                 PerTensor, PerRow, PerGroup, Unscaled; QuantSpec (a format + a granularity)
    storage:     quantize_(model, QuantConfig(format, granularity), storage="real" | "fake"), QuantConfig,
                 QuantizedTensor, spec_of, memory_report / MemoryReport
    optimizers:  SGD, AdamW (mode= "eco" | "master" | "naive" | "exact" | "kahan"), State8bit / State4bit
                 (8-bit / 4-bit AdamW moments), NonFiniteGradientError; Muon (2-D hidden weights) and muon_with_adamw;
                 Lion
    checkpoints: save_checkpoint, load_checkpoint, export_safetensors, load_safetensors
    subpackages: ``ecoptim.distributed`` (DDP, FSDP2, compressed all-reduce), ``ecoptim.app`` (the paper's
                 experiments and the ``ecoptim`` command line; not imported here)
"""
from .formats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, INT4, INT8, PerGroup, PerRow, PerTensor, QuantSpec, Unscaled
from .qtensor import QuantizedTensor
from .convert import QuantConfig, quantize_, spec_of
from .memory import MemoryReport, memory_report
from .optim import SGD, AdamW, NonFiniteGradientError, State8bit, from_torch_state_dict, to_torch_state_dict
from .optim import Lion, Muon, State4bit, muon_with_adamw
from .checkpoint import export_safetensors, load_checkpoint, load_safetensors, save_checkpoint

__version__ = "0.1.0"

__all__ = ["FP8_E4M3", "FP8_E5M2", "BF16", "FP16", "FP32", "INT8", "INT4", "PerTensor", "PerRow", "PerGroup",
           "Unscaled", "QuantSpec", "QuantConfig", "QuantizedTensor", "quantize_", "spec_of", "memory_report",
           "MemoryReport", "SGD", "AdamW", "State8bit", "NonFiniteGradientError", "from_torch_state_dict",
           "to_torch_state_dict", "save_checkpoint", "load_checkpoint", "export_safetensors", "load_safetensors"]
__all__ += ["Muon", "muon_with_adamw", "State4bit", "Lion"]
