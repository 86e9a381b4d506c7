"""ecoptim optimizers: drop-in torch.optim classes that update quantized weights in place."""
from .adamw import AdamW, adamw_update_, eco_adamw_coef
from .base import MODES, NonFiniteGradientError, QuantOptimizer
from .muon import Muon, MuonWithAdamW, muon_with_adamw
from .lion import Lion, eco_lion_coef, lion_update_
from .interop import from_torch_state_dict, to_torch_state_dict
from .sgd import SGD, eco_sgd_coef, sgd_update_
from .state8 import State4bit, State8bit

__all__ = ["AdamW", "SGD", "QuantOptimizer", "MODES", "NonFiniteGradientError", "adamw_update_", "sgd_update_",
           "eco_adamw_coef", "eco_sgd_coef", "State8bit", "from_torch_state_dict", "to_torch_state_dict"]
__all__ += ["Muon", "MuonWithAdamW", "muon_with_adamw", "State4bit", "Lion", "lion_update_", "eco_lion_coef"]
