"""Attention-level fidelity of sparse methods on captured q/k/v.

A capture folder holds ``layer{L:03d}_step{S:03d}.pt`` files, each a dict
``{"q", "k", "v": (B, H, N, D) tensors, "grid": tuple, "layer": int,
"layer_name": str, "step": int}`` (read with ``weights_only=True``; context-parallel runs write one
``..._heads{H0}-{H1}.pt`` per head group, joined back into one capture here). The other transformers of a
pipeline (Wan 2.2's ``transformer_2``, Ideogram 4's ``unconditional_transformer``, MiniMax-H3's
``transformer_ref``) write theirs with their prefix, ``transformer_2.layer{L:03d}_step{S:03d}.pt``: they are
read too, as layers of their own (rows keyed by ``prefix`` and layer, after ``pipe.transformer``'s), so a
one-transformer folder reads as it always did. Written by::

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
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..atomic_files import BadFileError
from ..methods import Method
from ..pipelines.capture import CAPTURE_NAME, capture_files

__all__ = ["load_capture", "capture_groups", "method_attention", "matched_method", "bench_fidelity", "fidelity_table"]

_EXPECTED = ("a capture file of dit_accel.apply(..., capture=DIR): {'q', 'k', 'v': (B, H, N, D) float tensors, "
             "'grid': ints whose product is N}")


def _name_key(path: Path) -> Tuple[str, int, int, int]:
    """(transformer prefix, layer, step, first head or -1) of a capture file's name; "" (``pipe.transformer``)
    sorts first."""
    name = CAPTURE_NAME.match(path.name)
    return name["prefix"], int(name["layer"]), int(name["step"]), -1 if name["h0"] is None else int(name["h0"])


def load_capture(directory) -> List[Path]:
    """Capture files of ``directory``, of every transformer, sorted by (transformer prefix, layer, step, first
    head); ValueError when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--capture {directory}: not a folder; make one with `dit-accel eval ... --capture DIR` "
                         "or dit_accel.apply(pipe, Dense(), capture=DIR)")
    # Every transformer's files, read explicitly: keyed by their prefix from here on (groups, grids, rows).
    files = sorted(capture_files(directory), key=_name_key)
    if not files:
        raise ValueError(f"--capture {directory}: no layerLLL_stepSSS.pt files found")
    return files


def capture_groups(files: Sequence[Path]) -> List[List[Path]]:
    """``files`` (sorted by :func:`load_capture`) grouped per (transformer, layer, step): one whole-sequence file,
    or the head files ``_headsH0-H1`` of the context-parallel ranks (one capture, not one step each). ValueError
    when a (transformer, layer, step) has both."""
    groups: Dict[Tuple[str, int, int], List[Path]] = {}
    for path in files:
        groups.setdefault(_name_key(path)[:3], []).append(path)
    for group in groups.values():
        whole = [p for p in group if _name_key(p)[3] < 0]
        if whole and len(group) > 1:
            heads = next(p for p in group if _name_key(p)[3] >= 0)
            raise ValueError(f"--capture {group[0].parent}: {whole[0].name} and {heads.name} both hold that layer "
                             "and step (a whole capture and a context-parallel head group: two runs in one folder); "
                             "keep one run's files per folder")
    return list(groups.values())


def _read_capture(path: Path) -> dict:
    """One capture file, checked: q, k, v ``(B, H, N, D)`` float tensors of one shape, finite, and a token grid
    of positive ints whose product is N; BadFileError naming the file otherwise (truncated, empty, another
    pickle, objects that are not tensors or plain types)."""
    redo = "capture it again, or move it out of the --capture folder"  # (what to do: the run stops at it)
    try:  # weights_only: a capture file shared by someone else cannot run code
        if path.stat().st_size == 0:  # (was "cannot be read (EOFError: )")
            raise BadFileError(path, f"is empty (0 bytes: a capture cut short): {redo}", _EXPECTED)
        data = torch.load(path, map_location="cpu", weights_only=True)
    except BadFileError:
        raise
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise BadFileError(path, "holds objects other than tensors and plain types, which are not loaded (a "
                               "pickle can run code); capture it again with this dit_accel", _EXPECTED) from None
        raise BadFileError(path, f"cannot be read (UnpicklingError: {' '.join(str(err).split())[:100]}): {redo}",
                           _EXPECTED) from None
    except Exception as err:  # zip, pickle and EOF errors come in many types
        raise BadFileError(path, f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:100]}): "
                           f"{redo}", _EXPECTED) from None
    ok = isinstance(data, dict) and all(isinstance(data.get(n), torch.Tensor) and data[n].dim() == 4
                                        and data[n].is_floating_point() for n in ("q", "k", "v"))
    if not ok or not (data["q"].shape == data["k"].shape == data["v"].shape):
        raise BadFileError(path, "holds another structure (or q, k, v of different shapes or not float)", _EXPECTED)
    grid, tokens = data.get("grid"), data["q"].shape[2]
    if not isinstance(grid, (tuple, list)) or not grid or not all(
            isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
        raise BadFileError(path, f"has grid {grid!r}, not a tuple of positive ints", _EXPECTED)
    if math.prod(grid) != tokens:
        raise BadFileError(path, f"has grid {tuple(grid)} ({math.prod(grid)} tokens) but its q, k, v hold {tokens} "
                           "tokens", _EXPECTED)
    for name, kind in (("layer", int), ("step", int), ("layer_name", str)):
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            raise BadFileError(path, f"has {name} {data[name]!r}, not a{'n' * (kind is int)} {kind.__name__}",
                               _EXPECTED)
    for name in ("q", "k", "v"):
        if not bool(torch.isfinite(data[name]).all()):
            raise BadFileError(path, f"its {name} holds NaN or inf values", _EXPECTED + ", all finite")
    return data


def _read_group(group: List[Path]) -> dict:
    """One capture of a (layer, step): its file, or its context-parallel head files joined along the heads (they
    must cover heads 0..H without gaps or overlaps, on one grid and shape)."""
    if len(group) == 1 and _name_key(group[0])[3] < 0:
        return _read_capture(group[0])
    parts, start = [], 0
    for path in group:
        data = _read_capture(path)
        name = CAPTURE_NAME.match(path.name)
        h0, h1 = int(name["h0"]), int(name["h1"])
        heads = data["q"].shape[1]
        if h0 != start or h1 - h0 != heads:
            raise BadFileError(path, f"holds heads {h0}-{h1} ({heads} in q) after heads 0-{start} of that layer "
                               "and step (a head group is missing, overlaps or is from another run)",
                               "the head files of one context-parallel run: heads 0-a, a-b, ... without gaps")
        if parts and (tuple(data["grid"]) != tuple(parts[0]["grid"])
                      or data["q"].shape[::2] != parts[0]["q"].shape[::2]):
            raise BadFileError(path, f"has grid {tuple(data['grid'])} and q {tuple(data['q'].shape)}, unlike "
                               f"{group[0].name} ({tuple(parts[0]['grid'])}, {tuple(parts[0]['q'].shape)})",
                               "the head files of one context-parallel run: one grid, batch, length and head size")
        parts.append(data)
        start = h1
    joined = {n: torch.cat([p[n] for p in parts], dim=1) for n in ("q", "k", "v")}
    return {**parts[0], **joined}


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


def _check_bench_args(methods, match_density, device, backend, max_files) -> None:
    """:func:`bench_fidelity`'s arguments, before a capture is read; ValueError naming the bad one."""
    from .._util import device_error, is_int, is_number
    from ..pipelines.apply_checks import BACKENDS

    # (before: {} gave an empty table without a word; a list was AttributeError "no attribute 'items'", a name or a
    # class in place of a config AttributeError "'str' object has no attribute 'plan'" or a TypeError about grid)
    example = "e.g. {'tile': dit_accel.Tile(), 'sla': dit_accel.SLA(topk=0.1)}"
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"methods={methods!r} is invalid: a non-empty mapping {{label: method config}}, {example}"[:400])
    bad = next((label for label, method in methods.items() if not isinstance(method, Method)), None)
    if bad is not None:
        raise ValueError(f"methods[{bad!r}] is {methods[bad]!r}, not a method config: give an instance such as "
                         f"dit_accel.Tile() (or dit_accel.method_from_name('tile')), {example}")
    # (before: an unknown backend ran each method's default without a word, and a bad device was torch's RuntimeError
    # after the first capture was read)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    problem = device_error(device, flag="device", advice="use device='cpu'")
    if problem is not None:
        raise ValueError(problem)
    # (as `bench fidelity` checks its flags: max_files=-1 dropped the last capture, 0 gave an empty table, and
    # match_density=0 compared the methods' own densities, each without a word)
    if max_files is not None and not (is_int(max_files) and max_files >= 1):
        raise ValueError(f"max_files={max_files!r} is invalid: expected an integer >= 1 (or None: every capture)")
    if match_density is not None and not (is_number(match_density) and 0 < match_density <= 1):
        raise ValueError(f"match_density={match_density!r} is invalid: expected a density in (0, 1] (or None: "
                         "each method's own)")


def bench_fidelity(capture_dir, methods: Dict[str, Method], *, match_density: Optional[float] = None,
                   device="cpu", backend: str = "auto", max_files: Optional[int] = None, log=print) -> dict:
    """Relative L2 error and cosine similarity of each method vs dense, per captured layer.

    Args:
        capture_dir: folder of capture files (see module docstring).
        methods: ``{label: method config}``.
        match_density: retune methods to this density (see :func:`matched_method`).
        device: where attention runs; files are loaded to it one at a time.
        max_files: only the first captures (sorted by transformer prefix, layer, step; the head files of one
            (layer, step), written under context parallelism, count as one).

    Rows and ``per_layer`` entries carry the transformer's ``prefix`` (``""`` for ``pipe.transformer``): the
    layers of each transformer of a pipeline are their own rows.
    """
    from tqdm.auto import tqdm

    _check_bench_args(methods, match_density, device, backend, max_files)
    groups = capture_groups(load_capture(capture_dir))[:max_files]
    rows: List[dict] = []
    notes: List[str] = []
    tuned: Dict[tuple, Method] = {}  # (label, grid) -> retuned config, built once per geometry
    grids: Dict[Tuple[str, int], Tuple[tuple, str]] = {}  # (prefix, layer) -> (grid, file): one grid per layer
    failed: Optional[Tuple[str, tuple]] = None  # the first method call that failed, and its grid
    for group in tqdm(groups, desc="fidelity", unit="capture"):
        data = _read_group(group)
        path = group[0]
        q, k, v = (data[n].to(device, torch.float32) for n in ("q", "k", "v"))
        grid = tuple(data["grid"])
        prefix = _name_key(path)[0]
        layer = int(data.get("layer", _name_key(path)[1]))
        first = grids.setdefault((prefix, layer), (grid, path.name))
        if first[0] != grid:
            which = f"layer {layer}" + (f" of {prefix[:-1]}" if prefix else "")
            raise ValueError(f"--capture {path.parent}: {which} was captured on grid {first[0]} in {first[1]} "
                             f"and on grid {grid} in {path.name}: two runs in one folder; capture each run into an "
                             "empty folder")
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
                failed = failed or (notes[-1], grid)
                continue
            err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            cos = float(F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0))
            rows.append({"file": "+".join(p.name for p in group), "prefix": prefix, "layer": layer,
                         "layer_name": data.get("layer_name", ""), "step": int(data.get("step", _name_key(path)[2])),
                         "grid": list(grid), "tokens": q.shape[-2], "heads": q.shape[1], "method": label,
                         "config": cfg.to_dict(), "density": density, "rel_l2": err, "cosine": cos})
    if failed and not rows:  # (else an empty table, exit 0 and a results file of no rows)
        raise ValueError(f"no method ran on the captures of {capture_dir}: {failed[0]}; give methods, and options "
                         f"through --method-config, that fit their token grid {failed[1]}")
    for line in notes:
        log(line)
    per_layer: Dict[Tuple[str, int, str], dict] = {}
    for r in rows:
        slot = per_layer.setdefault((r["prefix"], r["layer"], r["method"]), {
            "prefix": r["prefix"], "layer": r["layer"], "layer_name": r["layer_name"], "method": r["method"], "n": 0,
            "rel_l2": 0.0, "cosine": 0.0, "density": 0.0})
        slot["n"] += 1
        for key in ("rel_l2", "cosine", "density"):
            slot[key] += r[key]
    layers = []
    for slot in per_layer.values():
        n = slot.pop("n")
        layers.append({**slot, **{k: slot[k] / n for k in ("rel_l2", "cosine", "density")}, "steps": n})
    layers.sort(key=lambda s: (s["prefix"], s["layer"], s["method"]))
    import dit_accel

    return {"kind": "fidelity", "capture": str(capture_dir), "files": sum(map(len, groups)), "match_density": match_density,
            "device": str(device), "methods": {k: m.to_dict() for k, m in methods.items()},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": {"dit_accel": dit_accel.__version__, "torch": torch.__version__},
            "notes": notes, "per_layer": layers, "rows": rows}


def fidelity_table(result: dict) -> str:
    """Markdown: one row per (layer, method) with density, relative L2 and cosine; a layer of another transformer
    than ``pipe.transformer`` shows its prefix (``transformer_2.3``)."""
    from .report import markdown_table

    rows = [[f"{s.get('prefix', '')}{s['layer']}", s["layer_name"] or "-", s["method"], f"{s['density']:.3f}",
             f"{s['rel_l2']:.4f}", f"{s['cosine']:.5f}", str(s["steps"])] for s in result["per_layer"]]
    return markdown_table(["layer", "name", "method", "density", "rel. L2 error", "cosine", "steps"], rows)
