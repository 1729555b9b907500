"""Checkpoints: reading and writing trained weights.

- :mod:`.finetuned`: the folder ``dit-accel finetune`` writes (a Diffusers LoRA plus the SLA projections, the
  method they were trained with) and ``load_method`` / ``read_weights_info`` / ``apply(weights=...)`` read.
- :mod:`.vsa_gates`: VSA gate weights (``to_gate_compress``) in sparse-distilled checkpoints such as FastWan,
  which Diffusers drops on load.
- :mod:`.lora_checks`: the checks both run before a model or folder changes (float, finite tensors; LoRA whose
  modules exist, are Linear/Conv and take its shapes) and the undo of a LoRA load peft fails part-way.
- :mod:`.convert`: checkpoints of the SLA reference code (TurboDiffusion, thu-ml/SLA) as weights folders
  (``dit-accel convert``).

The public names are ``dit_accel.load_method`` and ``dit_accel.read_weights_info``; ``dit_accel.convert`` and
``dit_accel.weights`` name the modules as before.
"""
