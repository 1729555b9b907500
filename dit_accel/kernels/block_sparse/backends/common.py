"""What every vendor conversion shares: a layout re-cut to another block grid, exactly, and the package probes.

A vendor kernel has its own block sizes (cuDNN: square 64 or 128; FlashAttention-4: multiples of its tiles).
:func:`block_states` re-cuts a :class:`~dit_accel.kernels.BlockLayout` to any grid whose blocks are multiples
or divisors of the layout's own, and says of every new block whether it is *empty* (no allowed in-range pair),
*full* (every in-range pair allowed: a kernel may run it unmasked) or *mixed* (needs an element mask). It works
on blocks and on the layout's deduplicated element masks, never on the ``N x N`` token mask, so production
layouts (32k tokens, 40 heads) convert in milliseconds.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Optional, Tuple

import torch

from ...._util import cdiv
from ...layout import BlockLayout

__all__ = ["EMPTY", "FULL", "MIXED", "block_states", "packed_lists", "package_reason", "cuda_arch", "cuda_reason",
           "vendor_import"]

EMPTY, FULL, MIXED = 0, 1, 2


def _table_states(layout: BlockLayout, gq: int, gk: int) -> torch.Tensor:
    """``[P + 2, 4, bq/gq, bk/gk]`` uint8: the state of every ``gq x gk`` sub-tile of each element mask, for the
    four tail cases (bit 0: the block is the ragged last query block, bit 1: the ragged last key block); row
    ``P`` is a full block, row ``P + 1`` an unvisited one."""
    bq, bk, dev = layout.block_q, layout.block_k, layout.device
    table = torch.cat([layout.mask_table.bool(), torch.ones(1, bq, bk, dtype=torch.bool, device=dev),
                       torch.zeros(1, bq, bk, dtype=torch.bool, device=dev)])
    q_rem = layout.q_len - (layout.num_q_blocks - 1) * bq
    k_rem = layout.kv_len - (layout.num_kv_blocks - 1) * bk
    rows, cols = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
    out = []
    for case in range(4):
        inside = ((rows < q_rem) if case & 1 else torch.ones_like(rows, dtype=torch.bool))[:, None] & \
                 ((cols < k_rem) if case & 2 else torch.ones_like(cols, dtype=torch.bool))[None, :]
        tiles = (table & inside).view(-1, bq // gq, gq, bk // gk, gk)
        free = (table | ~inside).view(-1, bq // gq, gq, bk // gk, gk)
        any_ = tiles.any(dim=(2, 4))
        all_ = free.all(dim=(2, 4))
        out.append(torch.where(any_, torch.where(all_, FULL, MIXED), EMPTY).to(torch.uint8))
    return torch.stack(out, dim=1)


def _fine_states(layout: BlockLayout, gq: int, gk: int) -> torch.Tensor:
    """``[Hl, cdiv(q_len, gq), cdiv(kv_len, gk)]`` states on the ``gq x gk`` grid (``gq | block_q``,
    ``gk | block_k``)."""
    visited, mask_ids = layout.block_masks()
    hl, n_q, n_k = visited.shape
    p = layout.mask_table.shape[0]
    row = torch.where(visited, torch.where(mask_ids >= 0, mask_ids.long(), p), p + 1)
    case = torch.zeros(n_q, n_k, dtype=torch.long, device=layout.device)
    if layout.q_len % layout.block_q:
        case[-1, :] += 1
    if layout.kv_len % layout.block_k:
        case[:, -1] += 2
    states = _table_states(layout, gq, gk)[row, case.expand_as(row)]  # [Hl, nQ, nK, rq, rk]
    rq, rk = states.shape[-2:]
    fine = states.permute(0, 1, 3, 2, 4).reshape(hl, n_q * rq, n_k * rk)
    return fine[:, :cdiv(layout.q_len, gq), :cdiv(layout.kv_len, gk)]


def block_states(layout: BlockLayout, block_q: int, block_k: int) -> torch.Tensor:
    """The layout re-cut to ``block_q x block_k`` blocks: uint8 ``[Hl, cdiv(q_len, block_q), cdiv(kv_len, block_k)]``
    of :data:`EMPTY`, :data:`FULL` or :data:`MIXED`, judged on in-range token pairs only.

    Each new block size must be a multiple or a divisor of the layout's (ValueError otherwise).
    """
    for name, new, old in (("block_q", block_q, layout.block_q), ("block_k", block_k, layout.block_k)):
        if new % old and old % new:
            raise ValueError(f"{name}={new} must be a multiple or a divisor of the layout's {name}={old}")
    gq, gk = math.gcd(block_q, layout.block_q), math.gcd(block_k, layout.block_k)
    fine = _fine_states(layout, gq, gk)
    fq, fk = block_q // gq, block_k // gk
    if fq == 1 and fk == 1:
        return fine
    hl, nf_q, nf_k = fine.shape
    n_q, n_k = cdiv(nf_q, fq), cdiv(nf_k, fk)
    # Cells past the tokens: neutral (empty for "any pair allowed", full for "every pair allowed").
    any_ = torch.zeros(hl, n_q * fq, n_k * fk, dtype=torch.bool, device=fine.device)
    all_ = torch.ones_like(any_)
    any_[:, :nf_q, :nf_k] = fine != EMPTY
    all_[:, :nf_q, :nf_k] = fine == FULL
    any_ = any_.view(hl, n_q, fq, n_k, fk).any(dim=(2, 4))
    all_ = all_.view(hl, n_q, fq, n_k, fk).all(dim=(2, 4))
    return torch.where(any_, torch.where(all_, FULL, MIXED), EMPTY).to(torch.uint8)


def packed_lists(selected: torch.Tensor, width: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[..., R, C]`` bool -> (counts int32 ``[..., R]``, ascending column indices int32 ``[..., R, width]``,
    entries past a row's count 0). ``width`` defaults to the largest count (at least 1)."""
    counts = selected.sum(-1).to(torch.int32)
    if width is None:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    keep = torch.arange(order.shape[-1], device=selected.device) < counts[..., None]
    idx = torch.where(keep, order, 0).to(torch.int32)
    if idx.shape[-1] < width:  # fewer columns than the asked width
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]))
    return counts.contiguous(), idx.contiguous()


# ----------------------------------------------------------------------------- environment probes
def package_reason(module: str, pip_name: str, extra: str) -> Optional[str]:
    """None when ``module`` can be imported (found, without importing it), else how to install it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        found = False
    if found:
        return None
    return (f"the {pip_name} package is not installed (`pip install {pip_name}` or "
            f"`pip install \"dit_accel[{extra}]\"`); use backend='auto' or backend='triton'.")


def vendor_import(module: str, pip_name: str, extra: str):
    """Import an optional vendor module at launch time; a missing one raises BackendUnavailable saying how to
    install it (never an ImportError). By name, so the package's own imports stay free of optional packages."""
    import importlib

    from ...request import BackendUnavailable

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(f"{package_reason(module, pip_name, extra) or f'importing {module} failed'} "
                                 f"({type(err).__name__}: {err})") from None


def cuda_reason(device: torch.device, label: str) -> Optional[str]:
    """None for a CUDA device torch can use, else why ``label`` cannot run there."""
    if device.type != "cuda":
        return f"{label} runs on CUDA devices only, not {device.type!r}; use backend='auto' (or 'torch' on CPU)."
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch; use backend='torch' on this machine."
    return None


def cuda_arch(device: torch.device) -> int:
    """Compute capability as one number (90 for sm_90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor
