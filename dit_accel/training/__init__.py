"""Fine-tuning for sparse attention: LoRA (+ SLA projections) by distillation or on data.

Public API::

    from dit_accel.training import FinetuneConfig, finetune, load_into, load_method

CLI: ``dit-accel finetune --help``. Output folders load back with
``dit_accel.apply(pipe, load_method(DIR), weights=DIR)``.
"""

# Eager import on purpose: the function `finetune` must shadow the submodule of the same name.
from .finetune import FinetuneConfig, finetune, validate_config
from ..checkpoints.finetuned import load_into, load_method, load_trained_weights, save_trained_weights

__all__ = ["FinetuneConfig", "finetune", "validate_config", "load_into", "load_trained_weights", "load_method",
           "save_trained_weights"]
