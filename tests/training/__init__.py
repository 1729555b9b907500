"""Fine-tuning tests. :data:`PROMPTS`: the prompts every tiny fine-tune here trains and evaluates on;
:func:`snapshot` and :func:`probe`: what a failed run must leave as it was (files, the model's output)."""

from pathlib import Path

import torch

PROMPTS = ["a red fox in snow", "waves at sunset", "a city street at night", "a cat on a sofa"]


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with the bytes of its files (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def probe(transformer):
    """tiny-wan's output on one fixed input."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 3, 8, 16, generator=g)
    emb = torch.randn(1, 16, transformer.config.text_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=emb,
                           return_dict=False)[0]
