"""What the block-sparse Triton launchers have run for a layout, read from their launch cache.

Kept apart from :mod:`.triton` (which it reads, never the reverse) for ``dit-accel bench gpu`` and the tests.
"""

from __future__ import annotations

from typing import Dict

import torch

from .. import selfcheck
from ..layout import BlockLayout
from .configs import resume_config, ws_config
from .launch_records import _BackwardLaunch, _Launch
from .triton import _PLANS, WS_VARIANT

__all__ = ["launched_variants"]


def launched_variants(layout: BlockLayout) -> Dict[str, list]:
    """What the launchers have run for ``layout`` so far, read from their launch cache (never on the call
    path; for ``dit-accel bench gpu`` and tests): ``{"forward": [...], "backward": [...]}``, one entry per
    call signature. A forward entry is its configuration's name, with ``" persistent"`` for the TMA
    (sm_90) kernel, or ``"<ws name> + <resume name>"`` where the warp-specialized pass and its resume
    pass ran; a backward entry names its dK/dV and dQ kernels' tiles, warps, stages and TMA, or the one-pass
    kernel's (``bwd_dkdv_dq-...``; both entries where calls of one signature took both)."""
    out: Dict[str, list] = {"forward": [], "backward": []}
    values = _PLANS.values(layout)
    ws_ran = {key[3:5] for key, value in values.items()
              if isinstance(key, tuple) and key[:1] == ("ws",) and value is not None}
    for key, value in values.items():
        if isinstance(value, _Launch):
            name = value.cfg.name + (" persistent" if value.cfg.tma else "")
            ws = ws_config(value.cfg, 90) if value.cfg.tma else None  # ws entries exist on sm_90 only
            if ws is not None and tuple(key[1][:2]) in ws_ran:
                device = next(x for x in key if isinstance(x, torch.device))
                dtype = next(x for x in key if isinstance(x, torch.dtype))
                if selfcheck.usable_fast(WS_VARIANT, device, dtype, key[1][3], layout.block_q, layout.block_k):
                    name = f"{ws.name} + {resume_config(ws).name}"
                else:  # (the forward asked the same cached verdict before it ran the one-loop kernel)
                    name += f" ({WS_VARIANT} disabled by its self-check)"
            out["forward"].append(name)
        elif isinstance(value, _BackwardLaunch):
            for one in sorted(value.ran or {False}):  # (an entry the calls have not run yet reads as two-pass)
                kernels = (("bwd_dkdv_dq", value.fused),) if one else zip(("bwd_dkdv", "bwd_dq"), value.steps)
                parts = [f"{kernel}-m{step.kw['BLOCK_M']}n{step.kw['BLOCK_N']}-w{step.kw['num_warps']}"
                         f"s{step.kw['num_stages']}{'-tma' if step.kw['TMA'] else ''}" for kernel, step in kernels]
                out["backward"].append(" + ".join(parts))
    return out
