"""Attention-level fidelity of sparse methods on captured q/k/v.

A capture folder holds ``layer{L:03d}_step{S:03d}.pt`` files, each a dict
``{"q", "k", "v": (B, H, N, D) tensors, "grid": tuple, "layer": int,
"layer_name": str, "step": int}``, written by::

    handle = dit_accel.apply(pipe, dit_accel.Dense(), capture="capture/", capture_layers=[0, 10],
                             capture_steps=[0, 25])
    pipe(prompt); handle.remove()

(or ``dit-accel eval ... --capture DIR``). :func:`bench_fidelity` runs every
method on those exact inputs, through the same plans ``dit_accel.apply``
uses, and compares with dense attention: relative L2 error
``||o - o_dense|| / ||o_dense||`` and cosine similarity, per layer (averaged
over the captured steps), beside each method's visited density.

``match_density=D`` re-tunes the methods to a common density so their errors
compare like for like: SLA ``topk = D``, Tile window and GNA kernel chosen
nearest ``D`` on the captured grid; Radial's density is fixed by its rule and
is reported as it is.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..atomic_files import BadFileError, is_temp_name
from ..methods import Method

__all__ = ["load_capture", "method_attention", "matched_method", "bench_fidelity", "fidelity_table"]

_NAME = re.compile(r"layer(\d+)_step(\d+)(?:_heads\d+-\d+)?\.pt$")


def load_capture(directory) -> List[Path]:
    """Capture files of ``directory`` sorted by (layer, step); ValueError when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--capture {directory}: not a folder; make one with `dit-accel eval ... --capture DIR` "
                         "or dit_accel.apply(pipe, Dense(), capture=DIR)")
    files = sorted((p for p in directory.iterdir() if _NAME.search(p.name) and not is_temp_name(p)),
                   key=lambda p: tuple(int(x) for x in _NAME.search(p.name).groups()))
    if not files:
        raise ValueError(f"--capture {directory}: no layerLLL_stepSSS.pt files found")
    return files


def _read_capture(path: Path) -> dict:
    """One capture file, checked: q, k, v ``(B, H, N, D)`` of one shape and the token grid; BadFileError
    naming the file otherwise (truncated, empty, another pickle)."""
    expected = "a capture file of dit_accel.apply(..., capture=DIR): {'q', 'k', 'v': (B, H, N, D) tensors, 'grid'}"
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # zip, pickle and EOF errors come in many types
        raise BadFileError(path, f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:100]})",
                           expected) from None
    ok = isinstance(data, dict) and all(isinstance(data.get(n), torch.Tensor) and data[n].dim() == 4
                                        for n in ("q", "k", "v"))
    if not ok or not (data["q"].shape == data["k"].shape == data["v"].shape) or not isinstance(
            data.get("grid"), (tuple, list)):
        raise BadFileError(path, "holds another structure (or q, k, v of different shapes)", expected)
    return data


@torch.no_grad()
def method_attention(q, k, v, method: Method, grid, *, backend: str = "auto") -> Tuple[torch.Tensor, float]:
    """Output of ``method`` on video tokens q, k, v ``(B, H, N, D)`` in raster order, and its visited density.

    Runs the method's plan exactly as the pipelines do (``Plan.run``); a dense plan runs dense attention.
    """
    plan = method.plan(grid)
    if plan.is_dense:
        return F.scaled_dot_product_attention(q, k, v), 1.0
    out, density = plan.run(q, k, v, backend=backend)
    return out, float(density)


def matched_method(method: Method, grid: Sequence[int], density: float) -> Method:
    """A config of the same method whose visited density on ``grid`` is near ``density`` (``Method.at_density``)."""
    return method.at_density(tuple(int(g) for g in grid), density)


# A retuned config within this factor of the target density counts as meeting it.
_DENSITY_SLACK = 1.15


def density_miss(method: Method, grid: Sequence[int], target: float) -> Optional[str]:
    """Why ``method`` (retuned by :func:`matched_method`) misses the density ``target`` on ``grid``, naming the
    nearest density it reaches; None when it meets it (or its density is chosen per call, as SLA's)."""
    reached = method.plan(tuple(grid)).density
    if reached is None or reached <= 0 or abs(math.log(reached / target)) <= math.log(_DENSITY_SLACK):
        return None
    return (f"density {target:g} is not reachable; the nearest reachable is {reached:.3f} ({method!r}), so its "
            "error is not compared at the target density")


def bench_fidelity(capture_dir, methods: Dict[str, Method], *, match_density: Optional[float] = None,
                   device="cpu", backend: str = "auto", max_files: Optional[int] = None, log=print) -> dict:
    """Relative L2 error and cosine similarity of each method vs dense, per captured layer.

    Args:
        capture_dir: folder of capture files (see module docstring).
        methods: ``{label: method config}``.
        match_density: retune methods to this density (see :func:`matched_method`).
        device: where attention runs; files are loaded to it one at a time.
        max_files: only the first files (sorted by layer, step).
    """
    from tqdm.auto import tqdm

    files = load_capture(capture_dir)[:max_files]
    rows: List[dict] = []
    notes: List[str] = []
    tuned: Dict[tuple, Method] = {}  # (label, grid) -> retuned config, built once per geometry
    for path in tqdm(files, desc="fidelity", unit="file"):
        data = _read_capture(path)
        q, k, v = (data[n].to(device, torch.float32) for n in ("q", "k", "v"))
        grid = tuple(int(g) for g in data["grid"])
        ref = F.scaled_dot_product_attention(q, k, v)
        for label, method in methods.items():
            cfg = method
            if match_density:
                if (label, grid) not in tuned:
                    tuned[(label, grid)] = matched_method(method, grid, match_density)
                    miss = density_miss(tuned[(label, grid)], grid, match_density)
                    if miss:
                        notes.append(f"{label} on grid {grid}: {miss}")
                cfg = tuned[(label, grid)]
            try:
                out, density = method_attention(q, k, v, cfg, grid, backend=backend)
            except (ValueError, TypeError, RuntimeError) as exc:
                notes.append(f"{label} on {path.name}: {type(exc).__name__}: {exc}"[:300])
                continue
            err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            cos = float(F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0))
            rows.append({"file": path.name, "layer": int(data.get("layer", -1)),
                         "layer_name": data.get("layer_name", ""), "step": int(data.get("step", -1)),
                         "grid": list(grid), "tokens": q.shape[-2], "heads": q.shape[1], "method": label,
                         "config": cfg.to_dict(), "density": density, "rel_l2": err, "cosine": cos})
    for line in notes:
        log(line)
    per_layer: Dict[Tuple[int, str], dict] = {}
    for r in rows:
        slot = per_layer.setdefault((r["layer"], r["method"]), {"layer": r["layer"], "layer_name": r["layer_name"],
                                                                 "method": r["method"], "n": 0, "rel_l2": 0.0,
                                                                 "cosine": 0.0, "density": 0.0})
        slot["n"] += 1
        for key in ("rel_l2", "cosine", "density"):
            slot[key] += r[key]
    layers = []
    for slot in per_layer.values():
        n = slot.pop("n")
        layers.append({**slot, **{k: slot[k] / n for k in ("rel_l2", "cosine", "density")}, "steps": n})
    layers.sort(key=lambda s: (s["layer"], s["method"]))
    import dit_accel

    return {"kind": "fidelity", "capture": str(capture_dir), "files": len(files), "match_density": match_density,
            "device": str(device), "methods": {k: m.to_dict() for k, m in methods.items()},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": {"dit_accel": dit_accel.__version__, "torch": torch.__version__},
            "notes": notes, "per_layer": layers, "rows": rows}


def fidelity_table(result: dict) -> str:
    """Markdown: one row per (layer, method) with density, relative L2 and cosine."""
    from .report import markdown_table

    rows = [[str(s["layer"]), s["layer_name"] or "-", s["method"], f"{s['density']:.3f}", f"{s['rel_l2']:.4f}",
             f"{s['cosine']:.5f}", str(s["steps"])] for s in result["per_layer"]]
    return markdown_table(["layer", "name", "method", "density", "rel. L2 error", "cosine", "steps"], rows)
