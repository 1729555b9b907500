"""What exactly ran: the record that ``results.json`` and ``generate``'s sidecars carry.

:func:`provenance` returns the sha256 of the prompts (and of the prompt file when one was given),
the seeds, the dit_accel version and git commit (when run from a checkout), the torch / triton /
diffusers versions, the device (GPU name or CPU model) and the run's method, plan or stack.
:func:`backends_used` reads from a ``handle.summary()`` / ``handle.stats()`` which attention
backend each call actually used, dense calls included.

Two eval folders can be compared (:func:`same_inputs`) only when their prompts, seeds, the settings that
change the videos and (where both record it) the model's weights agree.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["prompts_sha256", "file_sha256", "git_commit", "device_name", "provenance", "backends_used",
           "same_inputs"]


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the prompt list (one per line, in order): what decides the samples."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> Optional[dict]:
    """``{"commit", "dirty"}`` of the checkout dit_accel is imported from, or None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def device_name(device) -> str:
    """``"cuda: NVIDIA H100 80GB HBM3 (sm_90)"`` or ``"cpu: <model name>"``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda: {torch.cuda.get_device_name(index)} (sm_{major}{minor})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}: {model}"


def backends_used(summary: Optional[dict], stats: Optional[List[dict]] = None) -> Dict[str, object]:
    """Which attention backend each call used: sparse calls by kernel backend, and the dense calls (SDPA,
    the pipeline's own attention) with the reasons they ran dense, from a handle's summary and stats."""
    summary = summary or {}
    sparse: Dict[str, int] = {}
    for row in stats or []:
        for name in (row.get("backend") or "").split(","):
            if name and row.get("sparse_calls"):
                sparse[name] = sparse.get(name, 0) + int(row["sparse_calls"])
    return {"sparse_calls": summary.get("sparse_calls", 0), "sparse_backends": sparse
            or {name: None for name in summary.get("backends_used") or []},
            "dense_calls": summary.get("dense_calls", 0), "dense_backend": "sdpa (torch, the pipeline's own call)",
            "dense_reasons": summary.get("dense_reasons") or []}


def provenance(prompts: Sequence[str], seeds: Sequence[int], device, *, prompt_file: Optional[str] = None,
               run: Optional[object] = None) -> dict:
    """The record of what ran (see the module docstring); ``run`` is the method, plan or stack description."""
    from .. import __version__
    from .._util import versions

    out = {"prompts_sha256": prompts_sha256(list(prompts)), "prompt_count": len(prompts),
           "seeds": [int(s) for s in seeds], "prompt_file": None if prompt_file is None else str(prompt_file),
           "prompt_file_sha256": None if prompt_file is None else file_sha256(prompt_file),
           "dit_accel": __version__, "git": git_commit(), "versions": versions(("torch", "triton", "diffusers")),
           "device": device_name(device)}
    if run is not None:
        out["run"] = run
    return out


def same_inputs(a: dict, b: dict) -> Optional[str]:
    """None when two results share prompts, seeds and the settings that change the videos, else a one-line
    description of what differs."""
    pa, pb = a.get("provenance") or {}, b.get("provenance") or {}
    sa, sb = a.get("settings") or {}, b.get("settings") or {}
    ha = pa.get("prompts_sha256") or prompts_sha256(sa.get("prompts") or [])
    hb = pb.get("prompts_sha256") or prompts_sha256(sb.get("prompts") or [])
    if ha != hb and not _reordered(sa.get("prompts"), ha, sb.get("prompts"), hb):
        only = _only_in_one(sa.get("prompts"), sb.get("prompts"))
        return (f"the prompts differ ({len(sa.get('prompts') or [])} prompts, sha256 {ha[:12]} vs "
                f"{len(sb.get('prompts') or [])} prompts, sha256 {hb[:12]}{only})")
    seeds_a, seeds_b = list(sa.get("seeds") or []), list(sb.get("seeds") or [])
    if sorted(seeds_a, key=repr) != sorted(seeds_b, key=repr):  # (samples pair by prompt and seed: in any order)
        return f"the seeds differ ({seeds_a} vs {seeds_b})"
    from ..models.loading import same_model

    other = [f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in _GENERATION_SETTINGS
             if (not same_model(sa.get(k), sb.get(k)) if k == "model" else sa.get(k) != sb.get(k))]
    if other:  # other videos (and another dense baseline): their differences are not the methods'
        return f"the runs made other videos ({', '.join(other)}); run both evals with the same settings"
    ma, mb = pa.get("model_sha256"), pb.get("model_sha256")
    if ma and mb and ma != mb:  # one --model name, other weights: a relative path from two folders, retrained files
        return (f"the model's weights differ (--model {sa.get('model')}: sha256 {str(ma)[:18]} vs {str(mb)[:18]}), "
                "so did the dense baselines; compare runs of the same weights")
    return None


def _reordered(a, hash_a: str, b, hash_b: str) -> bool:
    """True when two prompt lists, each matching its recorded sha256, hold the same prompts in another order (a
    prompt file sorted or shuffled): the samples pair by prompt and seed, so they pair as they are. Before, such
    folders were refused as 'the prompts differ'."""
    if not (isinstance(a, list) and isinstance(b, list) and all(isinstance(p, str) for p in a + b)):
        return False
    return prompts_sha256(a) == hash_a and prompts_sha256(b) == hash_b and sorted(a) == sorted(b)


def _only_in_one(a, b) -> str:
    """``; 'PROMPT' only in A`` (or B) for two prompt lists, where one holds a prompt the other does not."""
    if not (isinstance(a, list) and isinstance(b, list)):
        return ""
    for side, mine, other in (("A", a, b), ("B", b, a)):
        extra = next((p for p in mine if p not in other), None)
        if extra is not None:
            return f"; {str(extra)[:60]!r} only in {side}"
    return ""


# The settings of EvalSettings that change the videos (repeats, warm-up and device change the timing only).
_GENERATION_SETTINGS = ("model", "frames", "height", "width", "steps", "guidance_scale", "max_sequence_length",
                        "dtype")
