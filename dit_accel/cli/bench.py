"""``dit-accel bench``: kernel speed and attention fidelity.

Examples::

    dit-accel bench kernels --device cpu --quick --out bench.json --plot bench.png
    dit-accel bench kernels --device cuda --json bench_h100.json
    dit-accel bench kernels --modelled --shapes "Wan2.1 480p,Wan2.1 720p" --densities 0.05
    dit-accel bench gpu --check --out gpu_report/
    dit-accel bench fidelity --capture capture/ --methods gna,tile,radial,sla --density 0.2
    dit-accel bench sass --arch 90 --kernel fwd --json sass.json
    dit-accel bench layouts --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .._util import repeated_error
from ..atomic_files import atomic_write_json
from .options import HelpFormatter, int_tuple, plain

__all__ = ["register", "run"]


_GPU_DESCRIPTION = """\
The acceptance run on a GPU machine, in 15 minutes (--budget): with --check, the kernels'
self-checks (dit-accel selftest --device cuda --json); then pytest -m gpu; then the timings at
production sizes (Wan 2.1 14B 480p and 720p at 40 heads x batch 2, FLUX 1024 px at 24 x 1, Wan 2.1
1.3B at 12 x 1, FLUX 4K): dense contenders and dense [fastest], Tile (64- and 128-token tiles:
the latter runs the sm_90 ws forward), GNA, radial and SLA (with a zero projection's linear branch, and
without one as pipelines run it before fine-tuning: sla-topk) with
backend auto (autotuner off and on) and the Triton kernels forced where auto chose otherwise. Every
row has its relative error against the fp32 twin and the kernel variant that ran. Writes
DIR/gpu_report.json and DIR/gpu_report.md; exits 1 when a check failed, a case crashed or a row is
over its tolerance (1e-2, gradients 2e-2).

example (a fresh GPU machine): pip install -e ".[test]" && dit-accel bench gpu --check --out gpu_report"""


_SASS_DESCRIPTION = """\
Compile every shipped block-sparse and SLA kernel configuration for GPU targets on this
machine (no GPU needed) and read the cubins with the ptxas, cuobjdump and nvdisasm that
ship with triton: registers, spill bytes, shared memory, occupancy, ptxas advisories
(C7515: serialised wgmma) and the SASS instructions per tile of each kernel's main loop,
beside the in-repo dense kernel with the same tile, warps, stages, dtype and target.
Compile-time analysis, not a measurement. Results are cached in $DIT_ACCEL_CACHE
(default ~/.cache/dit_accel); a cold run of every configuration takes minutes.

example: dit-accel bench sass --arch 90 --family block_sparse --kernel fwd --dtype bfloat16 --head-dim 128"""


#: ``bench sass``'s ``--family`` default: given otherwise beside ``--search``, it was dropped.
_SASS_FAMILIES = "block_sparse,sla"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark kernels (speed) or methods on captured q/k/v (fidelity)",
                              description=plain(__doc__), formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="bench_kind", metavar="{kernels,gpu,fidelity,sass,layouts}")
    sub.required = True

    k = sub.add_parser("kernels", help="block-sparse and SLA kernels vs dense SDPA at model shapes")
    k.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    k.add_argument("--quick", action="store_true", help="one shape, three densities, few repeats")
    k.add_argument("--densities", default=None, help="comma-separated target densities (default 0.05..0.5)")
    k.add_argument("--shapes", default=None, help="comma-separated substrings of shape names to keep, e.g. Wan,FLUX")
    k.add_argument("--backends", default=None,
                   help="block-sparse backends, e.g. triton,flex,torch (default: triton on GPU, torch on CPU)")
    k.add_argument("--repeats", type=int, default=None)
    k.add_argument("--warmup", type=int, default=None)
    k.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    k.add_argument("--no-sla", action="store_true", help="skip the SLA rows")
    k.add_argument("--no-vsa", action="store_true", help="skip the VSA rows (measured runs, video shapes)")
    k.add_argument("--threads", default=None,
                   help="CPU: comma-separated torch thread counts, each case runs at each (default 1,2; --quick: 1)")
    k.add_argument("--no-flex-compiled", action="store_true",
                   help="skip the torch.compile(flex_attention) contender (compiling takes seconds per case)")
    k.add_argument("--out", "--json", dest="out", metavar="FILE.json", help="write the results as JSON")
    k.add_argument("--plot", metavar="FILE.png", help="speedup vs density plot")
    k.add_argument("--modelled", action="store_true",
                   help="no GPU: predict the GPU table with the cost model (dit_accel.kernels.cost) from static "
                        "facts (tiles per query block, CTAs, per-tile rates); labelled MODELLED")
    k.add_argument("--arch", default="h100", help="--modelled: the cost model's constants (default h100)")
    k.add_argument("--tile", default=None, metavar="T,H,W",
                   help="--modelled: the STA tile the Tile windows are searched for (default a 64-token tile); "
                        "a 128-token tile such as 1,16,8 runs 128-row query blocks on CUDA")
    k.add_argument("--kernels", default=None,
                   help="--modelled: kernel variants, e.g. current,host,persistent,ring3,ws (default all)")
    k.set_defaults(func=run)

    g = sub.add_parser("gpu", help="the GPU acceptance run: self-checks, pytest -m gpu, then production-size "
                                   "timings with each row's error against the fp32 twin and the variant that ran, "
                                   "in 15 minutes: JSON + markdown for BENCHMARKS.md",
                       description=plain(_GPU_DESCRIPTION), formatter_class=HelpFormatter)
    g.add_argument("--out", required=True, metavar="DIR", help="folder for gpu_report.json and gpu_report.md")
    g.add_argument("--device", default="cuda")
    g.add_argument("--check", action="store_true",
                   help="run the kernels' self-checks (dit-accel selftest) first; exit 1 if any check fails")
    g.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 900); cases that no longer fit are skipped and listed")
    g.add_argument("--shapes", default=None, help="comma-separated substrings of the standard shapes to keep")
    g.add_argument("--densities", default=None, help="comma-separated target densities (default 0.05,0.1,0.2)")
    g.add_argument("--methods", default=None,
                   help="comma-separated of tile,tile-fit,tile-128,gna,radial,sla,sla-topk,vsa (default all; tile-fit: "
                        "the same Tile with its tile fitted to the grid (fit=True: no padded or masked tiles); "
                        "tile-128: Tile at a 128-token tile, whose CUDA calls run the 128-row ws forward; sla: with a zero projection whose "
                        "linear branch is computed; sla-topk: without one, as pipelines run SLA before fine-tuning; "
                        "vsa: VSA with a gate at sparsity 1 - density, its launches also timed alone)")
    g.add_argument("--autotune", default="both", choices=["both", "on", "off"],
                   help="sparse rows with the autotuner off, on (at the first density) or both (default)")
    g.add_argument("--no-backward", action="store_true", help="forward only")
    g.add_argument("--no-pytest", action="store_true", help="skip pytest -m gpu")
    g.add_argument("--allow-partial", action="store_true",
                   help="with --check: a self-check or pytest -m gpu run cut short by its time limit is reported, "
                        "not a failure (default: incomplete coverage fails the run)")
    g.set_defaults(func=run)

    f = sub.add_parser("fidelity", help="error of each method vs dense on captured q/k/v")
    f.add_argument("--capture", required=True, metavar="DIR",
                   help="folder of layerLLL_stepSSS.pt files, transformer_2.layerLLL_stepSSS.pt for a second "
                        "transformer (dit-accel eval --capture DIR, or dit_accel.apply(pipe, Dense(), capture=DIR))")
    f.add_argument("--methods", default="gna,tile,radial,sla", help="comma-separated methods")
    f.add_argument("--method-config", metavar="FILE", help="JSON/YAML method options, as for dit-accel eval")
    f.add_argument("--density", type=float, default=None, help="retune methods to this visited density")
    f.add_argument("--device", default="cpu")
    f.add_argument("--backend", default="auto")
    f.add_argument("--max-files", type=int, default=None)
    f.add_argument("--out", metavar="FILE.json")
    f.set_defaults(func=run)

    s = sub.add_parser("sass", help="static GPU inspection: SASS per tile vs the dense kernel, registers, spills, "
                                    "occupancy (compile-time, no GPU needed)",
                       description=plain(_SASS_DESCRIPTION), formatter_class=HelpFormatter)
    s.add_argument("--arch", default="80,89,90", help="comma-separated compute capabilities (default 80,89,90)")
    s.add_argument("--family", default=_SASS_FAMILIES, help="block_sparse, sla or both (default)")
    s.add_argument("--kernel", default=None, help="kernel names, e.g. fwd,bwd_dq (default: all)")
    s.add_argument("--dtype", default=None, help="e.g. bfloat16,float16 (default: all shipped)")
    s.add_argument("--head-dim", default=None, help="padded head dims, e.g. 64,128 (default: all shipped)")
    s.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    s.add_argument("--no-dense", action="store_true", help="skip the dense kernel beside each row")
    s.add_argument("--search", choices=["block_sparse", "sla"], default=None,
                   help="rank the candidate launch configurations of a family instead (slow: hundreds of compiles)")
    s.add_argument("--json", metavar="FILE.json", help="write the rows as JSON")
    s.set_defaults(func=_run_sass)

    lay = sub.add_parser("layouts", help="true density, padded work and masked tiles of every published and "
                                         "recommended setting at the Wan 2.1, HunyuanVideo and FastWan grids, "
                                         "from the layouts alone (no GPU)")
    lay.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    lay.add_argument("--grids", default=None, help="comma-separated substrings of the grid names (default all: "
                                                    "Wan 2.1 480p, Wan 2.1 720p, HunyuanVideo 720p, FastWan 448x832, "
                                                    "tiny-shapes-63)")
    lay.add_argument("--methods", default=None, help="comma-separated of tile,gna,radial,sla,vsa (default all)")
    lay.set_defaults(func=_run_layouts)
    return p


def _kept_shapes(text: str, shapes) -> list:
    """The ``shapes`` whose names hold one of ``--shapes``' comma-separated substrings (any case); none for a text
    that names no substring (``,`` or ``""`` matched every shape, starting a full benchmark)."""
    keep = [x.strip().lower() for x in text.split(",") if x.strip()]
    return [s for s in shapes if any(k in s.name.lower() for k in keep)]


def _shapes_error(text: str, shapes, which: str) -> "str | None":
    """Why ``--shapes`` cannot choose among ``shapes`` (None when it can): an entry that matches none of them (before:
    dropped without a word, ``Wan,FLUXX`` timing Wan alone) or no entry at all."""
    keep = [x.strip() for x in text.split(",") if x.strip()]
    missed = [k for k in keep if not any(k.lower() in s.name.lower() for s in shapes)]
    if keep and not missed:
        return None
    what = f": {', '.join(map(repr, missed))} matches none of" if missed else " matches none of"
    return (f"--shapes {text!r}{what} the {which} shapes: {', '.join(s.name for s in shapes)}; give parts of "
            "those names, comma-separated")


def _floats(text):
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return None


def _device_error(device: str, cuda_available: bool):
    """Why ``--device`` cannot be used here (None when it can); ``cuda_available`` False stands for a machine
    without a GPU (tests pass it to see the CPU-only words on any machine)."""
    from .checks import device_error

    if not cuda_available and str(device).startswith("cuda"):
        return f"--device {device} but no CUDA device is visible here; use --device cpu"
    return device_error(device)


def _gpu_device_error(device: str, cuda_available: bool):
    """Why ``bench gpu`` cannot time ``device`` (None when it can). It times GPU kernels only, so its advice
    without a GPU names the commands that run on a CPU, not a ``--device cpu`` it would refuse."""
    from .checks import device_error

    advice = ("bench gpu times GPU kernels only; without a GPU, `dit-accel bench kernels --device cpu` times the "
              "PyTorch twins and `dit-accel bench kernels --modelled` models GPU figures")
    if not cuda_available and str(device).startswith("cuda"):
        return f"--device {device} but no CUDA device is visible here; {advice}"
    return device_error(device, allowed=("cuda",), advice=advice)


def _plot_error(path) -> "str | None":
    """Why ``--plot`` cannot name the picture (None when it can): a suffix that is no image format matplotlib
    writes (``.txt``; none at all, where it writes ``NAME.png`` instead)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = os.path.splitext(str(path))[1].lower().lstrip(".")
    if suffix in formats:
        return None
    what = f"its suffix .{suffix} is no image format" if suffix else "it has no suffix to pick the image format"
    return (f"--plot {path}: {what}; end it with one of {', '.join('.' + f for f in formats)}, e.g. "
            f"{os.path.splitext(str(path))[0] or 'bench'}.png")


def _command_line(args) -> str:
    """The command that reproduces the run, as its results record it (--modelled: with the model's --arch, --tile
    and --kernels, which it dropped before: an h200 table said it came from the h100 command)."""
    parts = ["dit-accel bench kernels"]
    names = ("device", "densities", "shapes", "backends", "threads", "repeats", "warmup", "dtype", "out", "plot")
    for name in names + (("arch", "tile", "kernels") if args.modelled else ()):
        value = getattr(args, name)
        if value is not None:
            parts.append(f"--{name} {value}")
    parts += [flag for flag, on in (("--quick", args.quick), ("--no-sla", args.no_sla), ("--no-vsa", args.no_vsa),
                                    ("--no-flex-compiled", args.no_flex_compiled), ("--modelled", args.modelled)) if on]
    return " ".join(parts)


def run(args) -> int:
    if args.bench_kind == "layouts":
        return _run_layouts(args)
    if args.bench_kind == "gpu":
        return _run_gpu(args)
    return _run_kernels(args) if args.bench_kind == "kernels" else _run_fidelity(args)


def _run_gpu(args, **overrides) -> int:
    """``dit-accel bench gpu``; ``overrides`` go to :func:`~dit_accel.eval.bench_gpu.bench_gpu` (tests pass a fake
    timer and fake subprocess runners). 0: every check passed; 1: a check failed (listed); 2: bad arguments or
    no GPU."""
    import torch

    from ..eval import bench_gpu as gpu

    def fail(message: str) -> int:
        print(f"dit-accel bench gpu: {message}", file=sys.stderr)
        return 2

    from .checks import folder_error

    problem = folder_error(args.out, "--out")
    if problem:  # ("" wrote the reports into the working folder; a file stopped the run with an OSError, status 1)
        return fail(problem)
    shapes = list(gpu.STANDARD_SHAPES)
    if args.shapes is not None:
        if problem := _shapes_error(args.shapes, shapes, "standard"):
            return fail(problem)
        shapes = _kept_shapes(args.shapes, shapes)
    densities = _floats(args.densities) if args.densities else list(gpu.STANDARD_DENSITIES)
    if not densities or any(not 0 < d <= 1 for d in densities):
        return fail(f"--densities must be comma-separated numbers in (0, 1]; got {args.densities!r}")
    methods = [_gpu_method_name(m) for m in (args.methods or ",".join(gpu.STANDARD_METHODS)).split(",") if m.strip()]
    if not methods or set(methods) - set(gpu.STANDARD_METHODS):
        return fail(f"--methods takes {', '.join(gpu.STANDARD_METHODS)} (any case; sta = tile); got {args.methods!r}")
    problem = repeated_error("--densities", densities) or repeated_error("--methods", methods)
    if problem:  # (each ran twice, out of the one --budget)
        return fail(problem)
    budget = gpu.BUDGET_S if args.budget is None else args.budget
    if not budget > 0:
        return fail(f"--budget must be positive seconds; got {args.budget}")
    error = _gpu_device_error(args.device, torch.cuda.is_available())
    if error and not overrides:  # (tests pass a fake timer and run the logic on the CPU)
        if args.check:
            return fail("--check needs a CUDA GPU (the self-checks, pytest -m gpu and the timings run the GPU "
                        f"kernels): {error}. On a GPU machine: pip install -e \".[test]\" && "
                        "dit-accel bench gpu --check --out gpu_report; `dit-accel selftest --device cpu` checks the "
                        "kernels this machine runs")
        return fail(error)
    autotune = {"both": gpu.AUTOTUNE_MODES, "on": ("on",), "off": ("off",)}[args.autotune]
    kwargs = dict(device=args.device, shapes=shapes, densities=densities, methods=methods,
                  backward=not args.no_backward, budget_s=budget, check=args.check, pytest_gpu=not args.no_pytest,
                  autotune=autotune, allow_partial=getattr(args, "allow_partial", False))
    kwargs.update(overrides)
    report = gpu.bench_gpu(args.out, **kwargs)
    rows = report["rows"]
    skipped = sum(r.get("status") == "skipped" and r.get("error") == "time budget" for r in rows)
    print(f"{len(rows)} rows ({skipped} skipped for time); pytest: "
          f"{report.get('pytest', {}).get('summary', 'not run')}; selftest: "
          f"{report.get('selftest', {}).get('summary', 'not run')}")
    fails = report.get("failures", [])
    for line in fails:
        print(f"FAILED: {line}")
    print(f"{len(fails)} failure(s); report in {args.out}")
    return 1 if fails else 0


def _run_kernels(args) -> int:
    import torch

    from ..eval import bench

    from ..kernels.backends import BACKENDS

    def fail(message: str) -> int:
        print(f"dit-accel bench kernels: {message}", file=sys.stderr)
        return 2

    from .checks import file_error

    for flag, path, example in (("--out", args.out, "bench.json"), ("--plot", args.plot, "bench.png")):
        problem = file_error(path, flag, example) if path is not None else None
        if problem:  # now, not after the benchmark ran
            return fail(problem)
    if args.out and args.plot and os.path.abspath(os.path.expanduser(args.out)) == \
            os.path.abspath(os.path.expanduser(args.plot)):  # (the plot was written over the results)
        return fail(f"--out {args.out} and --plot {args.plot} name one file: the plot would replace the results; "
                    "give two paths, e.g. --out bench.json --plot bench.png")
    problem = _plot_error(args.plot) if args.plot is not None and not args.modelled else None
    if problem:  # (matplotlib refused it after the whole benchmark, or added ".png" to a name printed without it)
        return fail(problem)
    if args.modelled:
        return _run_modelled(args, fail)
    if args.tile:
        return fail("--tile applies to --modelled only (the timed benchmark searches 64-token tiles)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    error = _device_error(device, torch.cuda.is_available())
    if error:
        return fail(error)
    for name in ("repeats", "warmup"):
        value, minimum = getattr(args, name), 1 if name == "repeats" else 0
        if value is not None and value < minimum:
            return fail(f"--{name} must be >= {minimum}; got {value}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    unknown = sorted(set(backends or ()) - set(BACKENDS))
    if unknown or backends == []:
        return fail(f"--backends {args.backends!r}: choose from {', '.join(BACKENDS)} (comma-separated)")
    cuda = device.startswith("cuda")
    if not cuda and "triton" in (backends or ()):  # (before: a row at 0.01x, the interpreter's time as the kernel's)
        return fail("--backends triton on --device cpu would time Triton's interpreter, a correctness tool thousands "
                    "of times slower than the kernel on a GPU: drop triton (the CPU times torch and flex), or use "
                    "--modelled for GPU figures")
    if cuda:
        shapes = bench.GPU_SHAPES[:1] if args.quick else bench.GPU_SHAPES
    else:
        shapes = bench.CPU_QUICK_SHAPES if args.quick else bench.CPU_SHAPES
    if args.shapes is not None:
        if problem := _shapes_error(args.shapes, shapes, "GPU" if cuda else "CPU"):
            return fail(problem)
        shapes = _kept_shapes(args.shapes, shapes)
    densities = _floats(args.densities) if args.densities else (
        bench.CPU_QUICK_DENSITIES if args.quick else bench.DENSITIES)
    if not densities or any(not 0 < d <= 1 for d in densities):
        return fail(f"--densities must be comma-separated numbers in (0, 1] such as 0.1,0.25; "
                    f"got {args.densities!r}")
    threads = None
    if cuda and args.threads:
        return fail("--threads is for --device cpu")
    if not cuda:
        try:
            threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
        except ValueError:
            threads = []
        if not threads or min(threads) < 1:
            return fail(f"--threads must be comma-separated counts >= 1 such as 1,2; got {args.threads!r}")
    problem = repeated_error("--densities", densities) or repeated_error("--threads", threads or [])
    if problem:
        return fail(problem)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick and not cuda else None)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if not cuda:
        print("NOTE: CPU run - reduced shapes, the PyTorch backend and compiled FlexAttention (Triton kernels need "
              "a GPU); numbers are not comparable with GPU numbers.")
    result = _time_kernels(args, bench, shapes, densities, device=device, dtype=dtype, warmup=args.warmup,
                           repeats=repeats, backends=backends, sla=not args.no_sla, vsa=not args.no_vsa,
                           threads=threads, flex_compiled=False if args.no_flex_compiled else None)
    if result is None:
        return 130
    result["command"] = _command_line(args)
    print(f"device: {result['device_name']}, dtype {result['dtype']}, versions {result['versions']}, "
          f"{result['date']}, load average {result['load_average']} -> {result['load_average_end']}; "
          f"{result['timing']}")
    print(bench.kernels_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    if args.plot:
        bench.plot_kernels(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _time_kernels(args, bench, shapes, densities, **kwargs) -> "dict | None":
    """:func:`~dit_accel.eval.bench.bench_kernels` writing ``--out`` after each shape (``"complete": false`` until
    the end: a run stopped part-way kept nothing, as it wrote once at the end); None when interrupted."""
    saved = []

    def save(partial: dict) -> None:
        atomic_write_json(args.out, partial)
        saved.append(len(partial["rows"]))

    try:
        return bench.bench_kernels(shapes, densities, on_progress=save if args.out else None, **kwargs)
    except KeyboardInterrupt:
        kept = f"; {args.out} holds the {saved[-1]} row{'s' * (saved[-1] != 1)} timed so far" if saved else ""
        print(f'dit-accel bench kernels: interrupted{kept}' + (' ("complete": false)' if saved else ""),
              file=sys.stderr)
        return None


def _run_modelled(args, fail) -> int:
    """``bench kernels --modelled``: the cost model's table at the GPU shapes (no GPU)."""
    from ..eval import bench
    from ..kernels import cost

    if args.device not in (None, "cuda") and not str(args.device).startswith("cuda"):
        return fail("--modelled predicts GPU figures: leave out --device or pass cuda")
    timed = [flag for flag, value in (("--plot", args.plot), ("--threads", args.threads), ("--repeats", args.repeats),
                                      ("--warmup", args.warmup), ("--backends", args.backends), ("--dtype", args.dtype))
             if value is not None]
    timed += [flag for flag, on in (("--quick", args.quick), ("--no-vsa", args.no_vsa),
                                    ("--no-flex-compiled", args.no_flex_compiled)) if on]
    if timed:  # the model reads none of them: they would change nothing, silently
        return fail(f"{', '.join(timed)} {'applies' if len(timed) == 1 else 'apply'} to the timed benchmark, not "
                    "--modelled: drop " + ("it" if len(timed) == 1 else "them") + ", or leave out --modelled")
    kernels = [x.strip() for x in args.kernels.split(",") if x.strip()] if args.kernels else None
    if kernels is None and cost.kernels_for(args.arch):
        kernels = cost.kernels_for(args.arch)  # (h100: the measured fit and the modelled ones; h200: its fit)
    try:
        for kernel in kernels or ["current"]:
            cost.constants(args.arch, kernel)
    except ValueError as exc:
        return fail(str(exc))
    if problem := repeated_error("--kernels", kernels or []):
        return fail(problem)
    shapes = list(bench.GPU_SHAPES)
    if args.shapes is not None:
        if problem := _shapes_error(args.shapes, shapes, "GPU"):
            return fail(problem)
        shapes = _kept_shapes(args.shapes, shapes)
    densities = _floats(args.densities) if args.densities else list(bench.DENSITIES)
    if not densities or any(not 0 < d <= 1 for d in densities):
        return fail(f"--densities must be comma-separated numbers in (0, 1]; got {args.densities!r}")
    if problem := repeated_error("--densities", densities):
        return fail(problem)
    tile = None
    if args.tile:
        try:  # (read as generate and calibrate read --tile: 1x16x8 was refused here alone)
            tile = int_tuple(args.tile)
        except argparse.ArgumentTypeError:
            tile = ()
        tile = tile if isinstance(tile, tuple) else (tile,)
        if not tile or any(t < 1 for t in tile):
            return fail(f"--tile must be comma-separated positive ints such as 1,16,8; got {args.tile!r}")
        dims = sorted({len(s.grid) for s in shapes})
        if len(tile) not in dims:  # (before: no tile row at all, a note per density, and exit 0)
            return fail(f"--tile {args.tile} has {len(tile)} value(s), but the grids of the shapes kept have "
                        f"{' or '.join(map(str, dims))} dimensions: give one per grid dimension, e.g. 1,16,8 (T,H,W "
                        "of the video shapes) or 16,8 with --shapes FLUX")
    result = bench.model_kernels(shapes, densities, arch=args.arch, kernels=kernels, sla=not args.no_sla, tile=tile)
    result["command"] = _command_line(args)
    print(f"MODELLED {args.arch} (a model, not a measurement): {result['constants_source']}")
    print(bench.kernels_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.out:
        atomic_write_json(args.out, result, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0


def _run_fidelity(args) -> int:
    import torch

    from ..eval.fidelity import bench_fidelity, fidelity_table
    from ..eval.runner import load_method_specs
    from ..kernels.backends import BACKENDS

    error = _device_error(args.device, torch.cuda.is_available())
    if error is None and args.backend not in ("auto",) + BACKENDS:
        error = f"--backend {args.backend}: choose from auto, {', '.join(BACKENDS)}"
    if error is None and args.density is not None and not 0 < args.density <= 1:
        error = f"--density must be in (0, 1]; got {args.density}"
    if error is None and args.max_files is not None and args.max_files < 1:
        error = f"--max-files must be >= 1; got {args.max_files}"
    if error is None and not any(m.strip() for m in args.methods.split(",")):
        error = f"--methods {args.methods!r} names no method: give a comma-separated list such as gna,tile"
    if error is None and args.out is not None:
        from .checks import file_error

        error = file_error(args.out, "--out", "fidelity.json") or _fidelity_out_error(args)
    if error:
        print(f"dit-accel bench fidelity: {error}", file=sys.stderr)
        return 2
    try:
        specs = load_method_specs(args.methods.split(","), args.method_config, include_dense=True)
        result = bench_fidelity(args.capture, {s.label: s.method for s in specs}, match_density=args.density,
                                device=args.device, backend=args.backend, max_files=args.max_files)
    except ValueError as exc:
        print(f"dit-accel bench fidelity: {exc}", file=sys.stderr)
        return 2
    print(fidelity_table(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


def _fidelity_out_error(args) -> "str | None":
    """Why ``bench fidelity --out`` would write over an input (None when it would not): the ``--method-config``
    file, or a file of the ``--capture`` folder (before: the results replaced it, JSON in a .pt)."""
    from pathlib import Path

    from ..pipelines.capture import CAPTURE_NAME

    out = Path(args.out).expanduser().resolve()
    if args.method_config and out == Path(args.method_config).expanduser().resolve():
        return f"--out {args.out} is the --method-config file: the results would replace it; give another path"
    if out.parent == Path(args.capture).expanduser().resolve() and CAPTURE_NAME.match(out.name):
        return (f"--out {args.out} names a capture file of the --capture folder, which the run reads: give a path "
                "outside it, e.g. fidelity.json")
    return None


#: Kernel names ``bench sass --kernel`` takes (block-sparse and SLA).
_SASS_KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "bwd_dkdv_lin")


def _run_sass(args) -> int:
    """``dit-accel bench sass``: compile the shipped kernels for GPU targets and print the SASS table."""
    from .._util import versions
    from ..kernels import sass

    def words(text):
        return [w.strip() for w in text.split(",") if w.strip()] if text else None

    def refuse(message: str) -> int:
        print(f"dit-accel bench sass: {message}", file=sys.stderr)
        return 2

    try:
        archs = [int(a) for a in words(args.arch) or []]
        head_dims = [int(d) for d in words(args.head_dim)] if args.head_dim else None
    except ValueError:
        return refuse(f"--arch and --head-dim take comma-separated integers; got {args.arch!r}, {args.head_dim!r}")
    families = words(args.family) or []
    checks = [("--arch", archs, lambda a: a >= 80, "compute capabilities >= 80, e.g. 80,89,90"),
              ("--family", families, {"block_sparse", "sla"}.__contains__, "block_sparse, sla"),
              ("--kernel", words(args.kernel) or [], set(_SASS_KERNELS).__contains__, ", ".join(_SASS_KERNELS)),
              ("--dtype", words(args.dtype) or [], {"bfloat16", "float16", "float32"}.__contains__,
               "bfloat16, float16, float32"),
              ("--head-dim", head_dims or [], {64, 128, 256}.__contains__, "padded head dims 64, 128, 256")]
    for flag, values, ok, expected in checks:
        bad = [v for v in values if not ok(v)]
        if bad or (flag in ("--arch", "--family") and not values):
            return refuse(f"{flag} takes {expected}; got {bad or 'nothing'}")
        if problem := repeated_error(flag, values):  # (--arch 90,90 compiled and printed every row twice)
            return refuse(problem)
    if args.workers < 1:
        return refuse(f"--workers must be >= 1; got {args.workers}")
    ignored = _search_ignores(args)
    if ignored:  # (the search compiles every candidate of its family: these filters changed nothing, silently)
        return refuse(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to --search (it ranks "
                      f"every candidate configuration of --search {args.search} at --arch): drop "
                      + ("it" if len(ignored) == 1 else "them") + ", or leave out --search for the shipped table")
    from .checks import file_error

    problem = file_error(args.json, "--json", "sass.json") if args.json is not None else None
    if problem:  # now, not after the compiles (minutes; an hour for --search)
        return refuse(problem)
    if args.search:
        groups = sass.search(args.search, archs, workers=args.workers, progress=True)
        result = {"kind": "sass-search", "family": args.search, "versions": versions(),
                  "groups": {" ".join(map(str, k)): v for k, v in groups.items()}}
        for key, ranked in groups.items():
            best = ranked[0]
            cyc = sass.tile_cycles(best) if best.get("error") is None else None
            print(f"{' '.join(map(str, key)):<48} " + (f"best {best['name']:<44} "
                  f"{'clean' if sass.clean(best) else 'NOT CLEAN'} "
                  f"{cyc['per_pair']:.4f} cyc/pair ({cyc['bound']})" if cyc else "no candidate compiled"))
    else:
        rows = sass.report(archs, families, words(args.kernel), words(args.dtype), head_dims, dense=not args.no_dense,
                           workers=args.workers, progress=True)
        result = {"kind": "sass", "note": "compile-time analysis (no GPU): SASS of the compiled cubins",
                  "versions": versions(), "rows": rows}
        if not rows:
            return refuse("no shipped configuration matches these filters")
        print("Compile-time analysis: SASS instructions per tile of each kernel's main loop, beside the in-repo dense")
        print("kernel compiled with the same tile, warps, stages, dtype and target.")
        print(sass.sass_table(rows))
    if args.json:
        atomic_write_json(args.json, result, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def _search_ignores(args) -> list:
    """The ``bench sass`` flags given beside ``--search`` that it does not read (empty without ``--search``)."""
    if not args.search:
        return []
    given = [flag for flag, value in (("--kernel", args.kernel), ("--dtype", args.dtype), ("--head-dim", args.head_dim))
             if value is not None]
    given += ["--no-dense"] if args.no_dense else []
    return given + (["--family"] if args.family != _SASS_FAMILIES else [])


def _gpu_method_name(name: str) -> str:
    """A ``bench gpu --methods`` entry as its row name: any case, the method aliases (``sta`` = ``tile``) with a
    variant suffix kept (``STA-fit`` = ``tile-fit``)."""
    from ..methods import canonical_method_name

    base, dash, variant = name.strip().lower().partition("-")
    return canonical_method_name(base) + dash + variant


def _layouts_missing(grids, methods) -> str:
    """Why ``bench layouts`` would print no row (empty when it prints some): no setting of those methods at those
    grids, naming the methods each grid has."""
    from ..eval.bench_layouts import grid_settings

    have = {name: sorted({method for method, _, _ in grid_settings(name)}) for name in grids}
    if any(set(methods) & set(found) for found in have.values()):
        return ""
    return (f"no setting of --methods {','.join(methods)} at {', '.join(grids)} (there: "
            + "; ".join(f"{name}: {','.join(found) or 'none'}" for name, found in have.items())
            + "); choose from those")


def _run_layouts(args) -> int:
    """``dit-accel bench layouts``: the layouts' own figures, as JSON lines or a table."""
    from ..eval.bench_layouts import GRIDS, METHODS, layout_rows
    from ..methods import canonical_method_name

    wanted = [w.strip() for w in (args.grids or "").split(",") if w.strip()]
    grids = [name for name in GRIDS if not wanted or any(w.lower() in name.lower() for w in wanted)]
    if any(not any(w.lower() in name.lower() for name in GRIDS) for w in wanted):
        grids = []  # (an entry matching no grid was dropped without a word: 480p,FastWann printed 480p alone)
    # (any case, and the sta alias, as --method takes them)
    methods = [canonical_method_name(m) for m in (args.methods or "").split(",") if m.strip()] or list(METHODS)
    bad = [m for m in methods if m not in METHODS]
    named_none = [flag for flag, value in (("--grids", args.grids), ("--methods", args.methods))
                  if value is not None and not value.replace(",", "").strip()]  # (given, but empty: not "all")
    if not grids or bad or named_none:
        print(f"dit-accel bench layouts: --grids takes substrings of {', '.join(GRIDS)}; --methods takes "
              f"{','.join(METHODS)} (sta = tile); got --grids {args.grids!r} --methods {args.methods!r}",
              file=sys.stderr)
        return 2
    missing = _layouts_missing(grids, methods)
    if missing:  # (else an empty table, or no JSON line at all, and exit 0)
        print(f"dit-accel bench layouts: {missing}", file=sys.stderr)
        return 2
    if args.json:
        layout_rows(grids, methods, log=lambda row: print(json.dumps(row), flush=True))
        return 0
    rows = layout_rows(grids, methods)
    print(f"{'grid':<18} {'method':<7} {'true density':>12} {'padded work':>12} {'masked tiles':>13} {'by count':>9}  "
          "selection  config")
    for r in rows:
        count = "-" if r.get("kernel_lengths") is None else f"{r['kernel_lengths']:.3f}"
        print(f"{r['grid_name']:<18} {r['method']:<7} {r['density']:>12.4f} {r['padded_work']:>12.3f} "
              f"{r['masked_tiles']:>13.3f} {count:>9}  {r['selection']:<9}  {r['config']}")
    return 0
