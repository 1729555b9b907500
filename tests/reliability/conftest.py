"""Fixtures of the reliability tests that fault apply(), remove() and weights folders."""

import pytest
import torch

import dit_accel
from dit_accel import weights as W
from dit_accel.models.tiny import build_tiny_transformer

SLA = dit_accel.SLA(topk=0.5)


def write_weights_folder(path, lora_seed=None):
    """A weights folder (LoRA on to_q/to_v + SLA projections) for the tiny Wan transformer (seed 3) at ``path``;
    ``lora_seed``: other values of the same shape."""
    from peft import LoraConfig

    model = build_tiny_transformer("wan", seed=3)
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    with dit_accel.apply(model, SLA, backend="torch") as handle:
        model.add_adapter(lora)
        for p in handle.sla_projections().values():
            torch.nn.init.normal_(p.weight, std=0.3)
        W.save_trained_weights(path, transformer=model, method=SLA, lora_config=lora,
                               sla_projections=handle.sla_projections())
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_weights_folder(tmp_path_factory.mktemp("weights"))


@pytest.fixture()
def model():
    return build_tiny_transformer("wan", seed=3)
