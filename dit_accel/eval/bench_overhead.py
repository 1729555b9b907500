"""Call overhead of dit_accel on a small model (CPU): the unwrapped transformer vs the same one under apply().

The tiny Wan transformer at a small token grid (default (5, 8, 8) = 320 tokens, the size of the
tiny pipelines' default run) is called with the same inputs, unwrapped, under ``Dense()`` and
under sparse methods (each at the tiny Wan's defaults, plus two sparser layouts); the contenders run
interleaved in one process, their order rotating each round, and each ratio is the median of
per-round ratios to the unwrapped call. A sparse method
here is also compared with the dense call: at this size ``backend="auto"`` may run a layout as
masked dense attention (see :func:`dit_accel.kernels.block_sparse.naive.dense_is_faster`).

``--method-config FILE`` (the YAML/JSON of ``dit-accel eval --method-config``) replaces the
sparse contenders, e.g. to time the transformer at a large grid with the methods at chosen
densities; a row's ``backend``, ``dense_layers`` and ``layer_methods`` go to ``dit_accel.apply``, and its
``dense_steps``, ``dense_last_steps`` or ``weights`` (which a lone transformer call cannot run) are refused.

Commands::

    python -m dit_accel.eval.bench_overhead --rounds 30 --threads 1
    python -m dit_accel.eval.bench_overhead --model tiny-shapes --rounds 20
    python -m dit_accel.eval.bench_overhead --grid 17,24,24 --method-config docs/scripts/tiny_wan_9792.yaml --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics

import torch

from .._util import load_average, versions
from .bench_cpu import median_ratio, run_rounds


MODELS = ("tiny-wan", "tiny-shapes")
#: The rows timed in every run, which the ratios divide by: no method row may take their names.
BASELINES = ("unwrapped", "Dense()")


def run(grid=None, rounds: int = 30, threads: int = 1, calls_per_round: int = 3, methods=None,
        model: str = "tiny-wan", copies: int = 3, apply_kwargs=None) -> dict:
    """``{"rows": [{name, ms, vs_unwrapped, vs_dense, density}], ...}``: median ms per forward call, ``calls_per_round``
    calls per contender and round (:func:`dit_accel.eval.bench_cpu.run_rounds`, one warm-up call per copy).
    ``methods``: ``{label: method config}`` to time instead of the default sparse contenders; ``apply_kwargs``:
    ``{label: dit_accel.apply options}`` of those (``backend``, ``dense_layers``, ``layer_methods``).
    ``model``: ``"tiny-wan"`` (random weights, 2 heads of 12; grid default (5, 8, 8)) or ``"tiny-shapes"``
    (the shipped trained transformer of the README's main job, 4 heads of 32; grid default (4, 12, 12)).
    ``copies``: deep copies of the model per contender, round ``r`` calling copy ``r % copies`` (where a
    copy's weights landed in memory moved its time by up to 2% here, in either direction: one copy per
    contender would charge that to the contender)."""
    taken = [label for label in BASELINES if label in (methods or {})]
    if taken:  # (before: such a row replaced the baseline, and every ratio divided by the wrong time)
        raise ValueError(f"a method row is labelled {taken[0]!r}, the name of a baseline row "
                         f"({' and '.join(BASELINES)} are always timed, and the ratios divide by them): give that row "
                         "another label (label: in --method-config)")
    import dit_accel
    from ..models.tiny import build_tiny_transformer, tiny_transformer_inputs

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    torch.set_num_threads(threads)
    if model == "tiny-shapes":
        from ..models.tiny_shapes import TINY_SHAPES_GRID, load_tiny_shapes

        base, grid = load_tiny_shapes().transformer.eval(), tuple(grid or TINY_SHAPES_GRID)
    else:
        base, grid = build_tiny_transformer("wan").eval(), tuple(grid or (5, 8, 8))
    inputs = tiny_transformer_inputs("wan", base, grid=grid)
    inputs.pop("return_dict", None)
    methods = {"Dense()": dit_accel.Dense(), **(methods or default_methods(model))}
    contenders = {"unwrapped": [copy.deepcopy(base) for _ in range(copies)]}
    handles = {}
    for name, method in methods.items():
        contenders[name] = [copy.deepcopy(base) for _ in range(copies)]
        options = (apply_kwargs or {}).get(name, {})
        handles[name] = [dit_accel.apply(contender, method, **options) for contender in contenders[name]]
    load_start = load_average()
    with torch.no_grad():
        calls = {n: functools.partial(_calls, m, inputs, calls_per_round) for n, m in contenders.items()}
        times = run_rounds(calls, rounds, warmup=copies, shuffle=True)
    densities = {n: h[0].summary().get("mean_density") for n, h in handles.items()}
    rows = [{"name": n, "ms": round(statistics.median(t) / calls_per_round * 1e3, 3),
             "vs_unwrapped": round(median_ratio(times, n, "unwrapped"), 3),
             "vs_dense": round(median_ratio(times, n, "Dense()"), 3), "density": densities.get(n)}
            for n, t in times.items()]
    backends = {n: sorted({b for one in h for b in one.summary()["backends_used"]}) for n, h in handles.items()}
    return {"model": model, "grid": list(grid), "tokens": int(torch.tensor(grid).prod()), "rounds": rounds,
            "threads": threads, "copies": copies, "rows": rows, "backends": backends, "load_average": [load_start, load_average()],
            "versions": versions()}


def default_methods(model: str = "tiny-wan") -> dict:
    """The sparse contenders: each method at the model's defaults (what ``dit-accel generate --model MODEL
    --method NAME`` runs), and on tiny-wan two layouts that skip more (4x4-token tiles; a 3x5x5 neighbourhood)."""
    import dit_accel
    from ..methods import method_from_name
    from ..models.tiny import TINY_METHOD_DEFAULTS

    methods = {f"{name} ({model} default)": method_from_name(name, **options)
               for name, options in TINY_METHOD_DEFAULTS[model].items()}
    if model == "tiny-wan":
        methods["Tile(1x4x4, window 1)"] = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
        methods["GNA(3, 5, 5)"] = dit_accel.GNA(kernel_size=(3, 5, 5))
    return methods


#: The dit_accel.apply options of a --method-config row that a lone transformer call cannot take: it has no
#: denoising steps to count, and a fine-tuned folder's LoRA is folded in by a pipeline run, not here.
_LONE_CALL_REFUSES = ("dense_steps", "dense_last_steps", "weights")


def _check_apply_options(specs, path) -> None:
    """ValueError naming the row and option of ``--method-config`` that the timed calls would not honour."""
    for spec in specs:
        given = [key for key in _LONE_CALL_REFUSES if key in spec.apply_kwargs]
        if given:
            raise ValueError(f"--method-config {path}: row {spec.label} sets {given[0]}, which a lone transformer "
                             "call cannot run (no denoising steps, no pipeline to fold weights in): drop it, or time "
                             "the row with dit-accel eval; backend, dense_layers and layer_methods apply here")


def _calls(models, inputs, n: int) -> None:
    """``n`` calls of the next copy in ``models`` (rotated in place: one copy per round)."""
    model = models[0]
    models.append(models.pop(0))
    for _ in range(n):
        model(**inputs, return_dict=False)


def main(argv=None) -> None:
    from .._util import positive_int

    parser = argparse.ArgumentParser(prog="python -m dit_accel.eval.bench_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-wan", choices=MODELS)
    parser.add_argument("--grid", default=None, help="token grid T,H,W (default: the model's, 5,8,8 or 4,12,12)")
    parser.add_argument("--rounds", type=positive_int, default=30)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--calls", type=positive_int, default=3, help="calls per contender and round")
    parser.add_argument("--copies", type=positive_int, default=3,
                        help="deep copies of the model per contender, one per round")
    parser.add_argument("--method-config", metavar="FILE", help="methods to time (dit-accel eval's format)")
    args = parser.parse_args(argv)
    grid = None
    if args.grid:
        sizes = [x.strip() for x in args.grid.split(",")]
        if len(sizes) != 3 or not all(x.isdigit() and int(x) >= 1 for x in sizes):
            parser.error(f"--grid must be three token counts >= 1, T,H,W such as 5,8,8; got {args.grid!r}")
        grid = tuple(int(x) for x in sizes)
    # A file, method or grid the run refuses is a usage error (one line, exit 2), not a traceback.
    try:
        methods, options = None, None
        if args.method_config:
            from .runner import load_method_specs

            specs = load_method_specs(None, args.method_config)
            _check_apply_options(specs, args.method_config)
            methods = {spec.label: spec.method for spec in specs}
            options = {spec.label: spec.apply_kwargs for spec in specs}  # (dropped before: backend: flex ran auto's)
        result = run(grid, rounds=args.rounds, threads=args.threads, calls_per_round=args.calls, methods=methods,
                     model=args.model, copies=args.copies, apply_kwargs=options)
    except ValueError as exc:
        parser.error(str(exc))
    for row in result["rows"]:
        density = f"  density {row['density']:.3f}" if row["density"] is not None else ""
        print(f"{row['name']:<30} {row['ms']:10.3f} ms  {row['vs_unwrapped']:.3f}x the unwrapped call's time, "
              f"{row['vs_dense']:.3f}x Dense()'s{density}")
    print(json.dumps({k: result[k] for k in ("model", "grid", "tokens", "copies", "backends", "load_average")}))


if __name__ == "__main__":
    main()
