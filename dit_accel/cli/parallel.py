"""``--cp ulysses=N,ring=M``: context parallelism for the CLI commands, under ``torchrun``.

``torchrun --nproc_per_node 4 -m dit_accel.cli.generate --cp ulysses=2,ring=2 ...`` starts
one process per rank; :func:`start` joins the process group (NCCL on CUDA, gloo on CPU),
picks this rank's device and returns the Diffusers ``ContextParallelConfig`` that
:func:`enable` puts on the pipeline's transformers. Rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Optional, Tuple

__all__ = ["add_cp_option", "parse_cp", "start", "enable", "is_main"]


def parse_cp(text: str) -> Tuple[int, int]:
    """``"ulysses=2"``, ``"ring=2"``, ``"ulysses=2,ring=2"`` -> ``(ulysses, ring)``."""
    degrees = {"ulysses": 1, "ring": 1}
    for part in filter(None, re.split(r"[,\s]+", text.strip())):
        name, _, value = part.partition("=")
        if name not in degrees or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--cp {text!r}: expected ulysses=N and/or ring=M with N, M >= 1, "
                                             "e.g. ulysses=2 or ulysses=2,ring=2")
        degrees[name] = int(value)
    if degrees["ulysses"] * degrees["ring"] == 1:
        raise argparse.ArgumentTypeError(f"--cp {text!r}: ulysses or ring must be > 1")
    return degrees["ulysses"], degrees["ring"]


def add_cp_option(parser) -> None:
    parser.add_argument("--cp", type=parse_cp, default=None, metavar="ulysses=N,ring=M",
                        help="context parallelism over N*M processes started by torchrun (or accelerate launch); "
                             "rank 0 writes the outputs")


def start(degrees: Tuple[int, int], device: Optional[str]):
    """Join the process group torchrun set up; returns ``(ContextParallelConfig, device)``. ValueError (one
    line) when this is not a torchrun process or the process count does not match."""
    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    ulysses, ring = degrees
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world == 0:
        raise ValueError(f"--cp needs one process per rank: run `torchrun --nproc_per_node {ulysses * ring} -m "
                         "dit_accel.cli.generate --cp ...` (or accelerate launch)")
    if world != ulysses * ring:
        raise ValueError(f"--cp ulysses={ulysses},ring={ring} needs {ulysses * ring} processes; torchrun started "
                         f"{world}")
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring), device or "cpu"


def enable(pipe, config) -> None:
    """Context parallelism on the pipeline's transformer(s); ValueError when a model has no plan for it."""
    from ..pipelines.parallel import enable_context_parallel

    for name in ("transformer", "transformer_2"):
        transformer = getattr(pipe, name, None)
        if transformer is None:
            continue
        if getattr(transformer, "_cp_plan", None) is None:
            raise ValueError(f"{type(transformer).__name__} has no context-parallel plan in this Diffusers "
                             "release (Wan, FLUX and LTX-Video have one); run it without --cp")
        enable_context_parallel(transformer, config)


def is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
