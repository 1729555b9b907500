"""The dense-vs-dense noise floor of ``dit-accel eval``: how far dense is from dense.

Two floors appear as rows of every report:

- **seed pairing** (``dense~seed``): dense against dense with another seed for the same prompt
  (the seeds of a prompt rotated; with one seed, seed + 1 is generated). Its ground-truth, CLIP and
  time differences are what re-seeding alone moves; its PSNR is what an unrelated sample scores.
- **backend** (``dense~<backend>``): the same prompts and seeds with the dense attention run by another
  backend: dit_accel's Triton dense kernel (:func:`dit_accel.kernels.dense.dense_attention`) where
  triton can run, else PyTorch's math SDPA (``torch.nn.attention.SDPBackend.MATH``). Its PSNR/SSIM/LPIPS
  is the numerical floor: a method at least that close to dense is indistinguishable from dense.

:func:`dense_backend` swaps ``torch.nn.functional.scaled_dot_product_attention`` for the chosen backend
while its block runs and counts the calls each backend served (masked or dropout calls the Triton kernel
cannot take go to SDPA and are counted as such).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

__all__ = ["DENSE_TRITON", "SDPA_MATH", "pick_floor_backend", "dense_backend"]

DENSE_TRITON = "dit_accel.kernels.dense"
SDPA_MATH = "sdpa-math"


def pick_floor_backend(device) -> tuple:
    """``(backend, note)``: the Triton dense kernel where triton runs on a CUDA ``device``, else math SDPA
    (the note says why the Triton kernel was not used)."""
    from ..kernels.backends import triton_reason

    device = torch.device(device)
    if device.type == "cpu":
        return SDPA_MATH, (f"{DENSE_TRITON} runs on a CPU only through Triton's interpreter (slow, for tests; "
                           f"--floor-backend {DENSE_TRITON} forces it); the floor's other backend is math SDPA")
    why = triton_reason(device)
    if why is None:
        return DENSE_TRITON, None
    return SDPA_MATH, f"{DENSE_TRITON} cannot run here ({why}); the floor's other backend is math SDPA"


@contextlib.contextmanager
def dense_backend(name: str, counts: Optional[Dict[str, int]] = None):
    """Route every ``F.scaled_dot_product_attention`` call made inside the block through ``name``
    (:data:`DENSE_TRITON` or :data:`SDPA_MATH`); ``counts`` gets the calls per backend that ran them."""
    import torch.nn.functional as F

    if name not in (DENSE_TRITON, SDPA_MATH):
        raise ValueError(f"dense backend {name!r}: expected {DENSE_TRITON!r} or {SDPA_MATH!r}")
    counts = {} if counts is None else counts
    original = F.scaled_dot_product_attention

    def count(backend):
        counts[backend] = counts.get(backend, 0) + 1

    def math_sdpa(*args, **kwargs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            out = original(*args, **kwargs)
        count(SDPA_MATH)
        return out

    def triton_sdpa(*args, **kwargs):
        return _triton_call(*args, **kwargs)

    def _triton_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
        from ..kernels.dense import dense_attention

        q, k, v = query, key, value

        plain = (attn_mask is None and not dropout_p and not is_causal and not enable_gqa and q.dim() == 4
                 and q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[-1] == k.shape[-1] == v.shape[-1] <= 256
                 and q.dtype == k.dtype == v.dtype)
        if not plain:
            count("sdpa (inputs the Triton kernel does not take)")
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            enable_gqa=enable_gqa)
        count(DENSE_TRITON)
        return dense_attention(q, k, v, scale)

    F.scaled_dot_product_attention = triton_sdpa if name == DENSE_TRITON else math_sdpa
    try:
        yield counts
    finally:
        F.scaled_dot_product_attention = original
