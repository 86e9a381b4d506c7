"""ecoptim: train models whose weights are stored quantized, with no full-precision master copy.

Public API (documented in README.md):
    formats:    FP8_E4M3, FP8_E5M2, BF16, FP16, FP32, INT8, INT4, PerTensor, PerRow, PerGroup, QuantSpec
    storage:    QuantizedTensor, quantize_, memory_report
    optimizers: SGD, AdamW (modes eco | master | naive | exact | kahan), State8bit (8-bit AdamW states)
    checkpoints: save_checkpoint, load_checkpoint, export_safetensors, load_safetensors
"""
from .formats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, INT4, INT8, PerGroup, PerRow, PerTensor, QuantSpec, Unscaled
from .qtensor import QuantizedTensor
from .convert import quantize_, spec_of
from .memory import MemoryReport, memory_report
from .optim import SGD, AdamW, NonFiniteGradientError, State8bit, from_torch_state_dict, to_torch_state_dict
from .checkpoint import export_safetensors, load_checkpoint, load_safetensors, save_checkpoint

__version__ = "0.1.0"

__all__ = ["FP8_E4M3", "FP8_E5M2", "BF16", "FP16", "FP32", "INT8", "INT4", "PerTensor", "PerRow", "PerGroup",
           "Unscaled", "QuantSpec", "QuantizedTensor", "quantize_", "spec_of", "memory_report", "MemoryReport",
           "SGD", "AdamW", "State8bit", "NonFiniteGradientError", "from_torch_state_dict", "to_torch_state_dict", "save_checkpoint", "load_checkpoint", "export_safetensors",
           "load_safetensors"]
