"""Fine-tuning tests. :data:`PROMPTS`: the prompts every tiny fine-tune here trains and evaluates on;
:func:`tiny_config`: a one-step fine-tune's config; :func:`snapshot` and :func:`probe`: what a failed run must leave as it was (files, the model's output)."""

from pathlib import Path

import torch

PROMPTS = ["a red fox in snow", "waves at sunset", "a city street at night", "a cat on a sofa"]

#: The sample size of the tiny fine-tunes of the input tests (:func:`tiny_config`).
SHAPE = dict(frames=9, height=64, width=128, max_sequence_length=16)


def tiny_config(tmp_path, prompts_file, **kw):
    """A one-step SLA fine-tune of tiny-wan into ``tmp_path/out`` at :data:`SHAPE`, with ``kw`` over it."""
    import dit_accel
    from dit_accel.training import FinetuneConfig

    base = dict(model="tiny-wan", method=dit_accel.SLA(topk=0.5), output=str(tmp_path / "out"),
                prompts=str(prompts_file), steps=1, rank=4, seed=3, progress=False, eval_batches=0,
                gradient_accumulation_steps=1, **SHAPE)
    return FinetuneConfig(**{**base, **kw})


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
