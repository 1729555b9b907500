"""A tiny Wan dit_accel weights folder holding a LoRA, shared by the tests of LoRAs beside ``apply(weights=)``."""

import dit_accel
from dit_accel.models import tiny as T

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 3))


def lora_config(targets):
    """A rank-2 peft LoRA of ``targets`` that is not zero at first (its output differs from the base model's)."""
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=2, target_modules=list(targets), init_lora_weights=False)


def wan_lora_folder(folder):
    """``folder``: a dit_accel weights folder for tiny Wan (seed 3) under ``TILE``, holding a LoRA of to_q and to_v."""
    from dit_accel.checkpoints.finetuned import save_trained_weights

    model = T.build_tiny_transformer("wan", seed=3)
    model.add_adapter(lora_config(["to_q", "to_v"]))
    save_trained_weights(folder, transformer=model, method=TILE, lora_config=lora_config(["to_q", "to_v"]))
    return folder
