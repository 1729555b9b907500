"""Whether a model's tensors hold NaN or inf: the trainable ones after a step (a diverged run), every one before the
first step (a damaged checkpoint, which no learning rate can train out)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


def finite_weights(params: Dict[str, nn.Parameter]) -> bool:
    """Whether every trainable tensor is finite (one host sync)."""
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all())


def nonfinite_weights_error(module: nn.Module, what: str) -> Optional[str]:
    """The refusal of ``module`` (``what`` names it) when a floating parameter or buffer holds NaN or inf before
    training: every loss would be NaN, and the divergence report's advice (a lower --lr) would be wrong. None when
    all are finite. float8 tensors are read in bf16 (isfinite has no float8 kernel); tensors on meta are skipped."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers())
             if t.is_floating_point() and t.device.type != "meta"]
    with torch.no_grad():
        bad = [n for n, t in named
               if not bool(torch.isfinite(t if t.element_size() > 1 else t.to(torch.bfloat16)).all().cpu())]
    if not bad:
        return None
    return (f"{what} holds NaN or inf weights before training ({len(bad)} tensor(s), e.g. {bad[0]}): the checkpoint "
            f"is damaged or was saved in a dtype that overflowed, and fine-tuning cannot repair it (every loss would "
            f"be NaN); re-download or re-convert it, and check that it generates with dense attention first")
