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
    degrees, given = {"ulysses": 1, "ring": 1}, set()
    for part in filter(None, re.split(r"[,\s]+", text.strip())):
        name, _, value = part.partition("=")
        if name not in degrees or not re.fullmatch("[0-9]+", value) or int(value) < 1:
            what = ("no spaces around '='" if re.search(r"\s=|=\s", text) else f"{name!r} is not a key"
                    if name not in degrees else f"{part!r} is not a whole number >= 1")
            raise argparse.ArgumentTypeError(f"--cp {text!r}: expected ulysses=N and/or ring=M with N, M >= 1, "
                                             f"e.g. ulysses=2 or ulysses=2,ring=2 ({what})")
        if name in given:  # (the last one won before: ulysses=2,ulysses=4 ran 4 ranks, the typo unsaid)
            raise argparse.ArgumentTypeError(f"--cp {text!r}: {name} is given twice; give each of ulysses=N and "
                                             "ring=M once, e.g. ulysses=2,ring=2")
        given.add(name)
        degrees[name] = int(value)
    if degrees["ulysses"] * degrees["ring"] == 1:
        raise argparse.ArgumentTypeError(f"--cp {text!r}: ulysses or ring must be > 1")
    return degrees["ulysses"], degrees["ring"]


def add_cp_option(parser) -> None:
    parser.add_argument("--cp", type=parse_cp, default=None, metavar="ulysses=N,ring=M",
                        help="context parallelism over N*M processes started by torchrun (or accelerate launch); "
                             "rank 0 writes the outputs")


#: The pipeline attributes whose transformers ``--cp`` splits (the denoising transformers; Wan 2.2's two experts).
SPLIT_ATTRS = ("transformer", "transformer_2")


def early_heads_error(model, degrees: Optional[Tuple[int, int]]) -> Optional[str]:
    """The Ulysses heads check of :func:`enable` before ``model`` loads (minutes for a real model, on every rank),
    read from the transformer configs of its folder (a local folder, an embedded model's, a cached hub snapshot's);
    None where they fit or are not there (the check after loading covers the rest: models built in code)."""
    from ..models.loading import component_config, model_folder
    from ..pipelines.parallel import ulysses_heads_error

    if degrees is None or degrees[0] <= 1:
        return None
    folder = model_folder(model)
    for name in SPLIT_ATTRS if folder is not None else ():
        config = component_config(folder, name)
        problem = config and ulysses_heads_error(str(config.get("_class_name") or name), config, degrees[0])
        if problem:
            return problem
    return None


#: Seconds a process started without torchrun waits for the other ranks (``DIT_ACCEL_CP_TIMEOUT`` overrides).
RENDEZVOUS_TIMEOUT_S = 60.0


def start(degrees: Tuple[int, int], device: Optional[str]):
    """Join the process group torchrun set up; returns ``(ContextParallelConfig, device)``. ValueError (one
    line) when this is not a torchrun process, the process count does not match, or the other ranks never join
    (a leftover ``WORLD_SIZE`` from SLURM or accelerate: waited ``DIT_ACCEL_CP_TIMEOUT`` seconds, default 60)."""
    import torch
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    ulysses, ring = degrees
    if device is not None and ":" in str(device):  # (it was replaced by cuda:LOCAL_RANK without a word)
        raise ValueError(f"--device {device} with --cp: each rank runs on its own device, the GPU torchrun numbers "
                         "it (cuda:LOCAL_RANK); give --device cuda or leave --device out, and choose the GPUs with "
                         "CUDA_VISIBLE_DEVICES")
    world = _env_int("WORLD_SIZE", 0)
    if world == 0:
        raise ValueError(f"--cp needs one process per rank: run `torchrun --nproc_per_node {ulysses * ring} -m "
                         "dit_accel.cli.generate --cp ...` (or accelerate launch)")
    if world != ulysses * ring:
        raise ValueError(f"--cp ulysses={ulysses},ring={ring} needs {ulysses * ring} processes; torchrun started "
                         f"{world}")
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not dist.is_initialized():
        rank, store = _rendezvous(world)  # before any CUDA work: a refused start leaves nothing behind
        if cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        backend = "nccl" if cuda else "gloo"
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    elif cuda:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    if cuda:
        device = f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring), device or "cpu"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--cp: environment variable {name}={text!r} is not an integer; start the ranks with "
                         "torchrun, which sets it") from None


def _rendezvous_timeout() -> float:
    text = os.environ.get("DIT_ACCEL_CP_TIMEOUT", "").strip()
    if not text:
        return RENDEZVOUS_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise ValueError(f"DIT_ACCEL_CP_TIMEOUT={text!r}: expected the seconds to wait for the other ranks, a "
                         "number > 0 (e.g. 300)")
    return value


def _rendezvous(world: int):
    """``(rank, store)``: the TCP store of the ranks, joined within :func:`_rendezvous_timeout` seconds, or store
    None under torchrun (its agent hosts the store and started every rank). ValueError (one line) naming what is
    missing, or how long it waited, instead of torch's 30-minute wait or its raw errors."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    rank = _env_int("RANK", -1)
    hint = f"start it with torchrun --nproc_per_node {world}"
    if not 0 <= rank < world:
        raise ValueError(f"--cp: WORLD_SIZE={world} is set but RANK is {os.environ.get('RANK', 'not set')!r} (0 to "
                         f"{world - 1} expected): this process was not started by torchrun; {hint}")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return rank, None
    addr, port_text = os.environ.get("MASTER_ADDR", "").strip(), os.environ.get("MASTER_PORT", "").strip()
    for name, text in (("MASTER_ADDR", addr), ("MASTER_PORT", port_text)):
        if not text:
            raise ValueError(f"--cp: WORLD_SIZE={world} is set but {name} is not: this process was not started by "
                             f"torchrun (a WORLD_SIZE left over from SLURM or accelerate?); {hint}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--cp: MASTER_PORT={port_text!r} is not a port number (1 to 65535); {hint}")
    timeout = _rendezvous_timeout()
    try:
        store = dist.TCPStore(addr, int(port_text), world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=timeout), multi_tenant=True)
    except (RuntimeError, OSError) as err:  # DistStoreError (timed out), DistNetworkError (port, address)
        text = " ".join(str(err).split())
        if "timed out" not in text.lower():
            raise ValueError(f"--cp: cannot open the rendezvous at MASTER_ADDR={addr} MASTER_PORT={port_text} "
                             f"({text[:160]}); {hint}") from None
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        who = "only this process joined" if joined is None or joined.group(1) == "1" else \
            f"only {joined.group(1)} joined"
        if rank != 0:
            who = f"rank 0 never answered at {addr}:{port_text}"
        raise ValueError(f"waited {timeout:g} s for {world} ranks (WORLD_SIZE={world}) but {who}; {hint} "
                         "(DIT_ACCEL_CP_TIMEOUT=S waits longer)") from None
    store.set_timeout(default_pg_timeout)  # the ranks are all here: later collectives keep torch's timeout
    return rank, store


def enable(pipe, config) -> None:
    """Context parallelism on the pipeline's transformer(s); ValueError when a model has no plan for it or its
    heads do not split, checked for every transformer before any is changed. The pipeline's other transformers
    (MiniMax-H3's ``transformer_ref``, Ideogram 4's ``unconditional_transformer``) are not split: each rank runs
    them whole, which is right but not faster, and is said once (a :class:`~dit_accel.DitAccelWarning`)."""
    from .._util import DitAccelWarning
    from ..pipelines.context import TRANSFORMER_ATTRS, transformers_of
    from ..pipelines.parallel import check_process_group, check_ulysses_heads, enable_context_parallel

    split = [n for n in SPLIT_ATTRS if getattr(pipe, n, None) is not None]
    transformers = [t for _, t in transformers_of(pipe, SPLIT_ATTRS)]  # (one module under two names: split once)
    for transformer in transformers:
        if getattr(transformer, "_cp_plan", None) is None:
            raise ValueError(f"{type(transformer).__name__} has no context-parallel plan in this Diffusers "
                             "release (Wan, FLUX and LTX-Video have one); run it without --cp")
        check_ulysses_heads(transformer, config)
    check_process_group(config)  # (before any transformer changes: the second was refused after the first was split)
    for transformer in transformers:
        enable_context_parallel(transformer, config)
    whole = [f"{name} ({type(t).__name__})" for name in TRANSFORMER_ATTRS if name not in SPLIT_ATTRS
             for t in [getattr(pipe, name, None)] if t is not None and not any(t is s for s in transformers)]
    if whole and is_main():  # (before: unsaid, so the run looked split where each rank ran these in full)
        import warnings

        warnings.warn(f"--cp splits {type(pipe).__name__}'s {' and '.join(split)} "
                      f"across the ranks, not {', '.join(whole)}: every rank runs "
                      f"{'that transformer' if len(whole) == 1 else 'those'} whole, which gives the same output but "
                      "no speed-up for its calls", DitAccelWarning, stacklevel=2)


def is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
