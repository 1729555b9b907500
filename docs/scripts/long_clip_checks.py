"""Quick checks of a long-clip checkpoint of tiny-shapes (BENCHMARKS.md section 8).

    # dense ground truth of the 8 calibration prompts x seeds at 63 frames (batches of 4 prompts)
    python docs/scripts/long_clip_checks.py gt --weights DIR --guidance 2.0 --seeds 0
    # PSNR of the per-head Tile windows of `train_tiny --local` against dense, first N steps dense, and both GTs
    python docs/scripts/long_clip_checks.py psnr --weights DIR --prompts "a red circle moving right" --dense-steps 4
    # the same at 7 frames of 128x128 under another method
    python docs/scripts/long_clip_checks.py psnr --weights DIR --frames 7 --size 128 --method '{"method": "tile", ...}'
    # dense ground truth of the 8 calibration prompts, then PSNR of METHOD against it with 0, 1 and 2 dense steps
    # (--ft: a `dit-accel finetune` folder applied with the method), 4 prompts per pipeline call
    python docs/scripts/long_clip_checks.py sweep --weights DIR --frames 31 --dense-steps 0 1 2 --method JSON [--ft FT]
    # the same with the dense steps interleaved: steps 0, 1, 2, 4 and 6 dense, the others under METHOD
    python docs/scripts/long_clip_checks.py sweep --weights DIR --frames 31 --dense-steps 5 0,1,2,4,6 --method JSON
    # the same for saved SparsePlans (a method per step phase, layer and head) instead of METHOD, or for
    # `dit-accel finetune --plan` folders (the plan with its LoRA); --prompt-set held-out: 8 prompts outside the file
    python docs/scripts/long_clip_checks.py sweep --weights DIR --plans PLAN.json FT_DIR [...] [--prompt-set held-out]
    # per layer and head: the attention mass inside tile windows (4x4x4 tiles), dense, README's prompt, seed 0, and
    # the most that the best choice of key tiles per query tile at --oracle-density keeps (no method can keep more)
    python docs/scripts/long_clip_checks.py heads --weights DIR --frames 31 [--oracle-density 0.083]
    # the same for windows of whole frames (12x12 tokens)
    python docs/scripts/long_clip_checks.py heads --weights DIR --tile 1,12,12 --windows '[[1,1,1],[3,1,1],[5,1,1]]'

All run the stock pipeline call (12 steps, max_sequence_length 16; 48x48 unless --size) on the CPU, or on --device.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

WINDOWS = ((3, 1, 3), (3, 1, 3), (3, 3, 1), (3, 3, 1))  # heads 0-1: a row band, heads 2-3: a column band
KEYS = ("colour_ok", "shape_ok", "motion_ok", "consistent")


def _pipe(folder: str, shift: float = None, device: str = "cpu"):
    """The saved pipeline on ``device`` (fp32, TF32 off); ``shift``: its sampler's shift instead of the saved one
    (3 for tiny-shapes)."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    if shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 as on the CPU
    return pipe.to(device)


def _call(args) -> dict:
    return dict(num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=12, guidance_scale=args.guidance,
                max_sequence_length=16, output_type="np")


def ground_truth(args) -> None:
    from dit_accel.models.groundtruth import score_many

    pipe, prompts, start = _pipe(args.weights, device=args.device), _calibration_prompts(), time.perf_counter()
    videos = _videos(pipe, prompts, args.seeds, _call(args))
    names = [p for _ in args.seeds for p in prompts]
    print(f"guidance {args.guidance} seeds {args.seeds}: {score_many(videos, names)} "
          f"{time.perf_counter() - start:.0f}s", flush=True)


def psnr(args) -> None:
    import dit_accel
    from dit_accel.models.groundtruth import score_video

    pipe = _pipe(args.weights, device=args.device)
    from dit_accel.checkpoints.finetuned import method_from_dict

    method = method_from_dict(json.loads(args.method)) if args.method else dit_accel.Tile(tile=(4, 4, 4), window=WINDOWS)
    for prompt in args.prompts:
        start = time.perf_counter()
        dense = pipe(prompt, generator=torch.Generator().manual_seed(args.seed), **_call(args)).frames[0]
        t_dense = time.perf_counter() - start
        with dit_accel.apply(pipe, method, dense_steps=args.dense_steps):
            start = time.perf_counter()
            sparse = pipe(prompt, generator=torch.Generator().manual_seed(args.seed), **_call(args)).frames[0]
            t_sparse = time.perf_counter() - start
        db = _clip_psnr(dense, sparse)
        gd, gs = score_video(dense, prompt), score_video(sparse, prompt)
        print(f"{prompt!r} seed {args.seed}, {args.dense_steps} dense steps: PSNR {db:.1f} dB; dense GT "
              f"{[bool(gd[k]) for k in KEYS]}, sparse GT {[bool(gs[k]) for k in KEYS]}; "
              f"{t_dense:.1f} s vs {t_sparse:.1f} s", flush=True)


def _clip_psnr(dense, sparse) -> float:
    """PSNR of a whole clip against its dense twin, in dB from the MSE over all its frames (100 when equal): stricter
    than `dit-accel eval`'s and calibrate's mean of per-frame PSNRs, which a few far-off frames move less."""
    return float(10 * np.log10(1 / max(float(((dense - sparse) ** 2).mean()), 1e-10)))


def _frame_psnr(dense, sparse) -> float:
    """The mean of per-frame PSNRs in dB, the measure `calibrate` budgets and `dit-accel eval` reports."""
    from dit_accel.eval.metrics import psnr_per_frame

    return float(psnr_per_frame(sparse, dense).mean())


def _calibration_prompts() -> list:
    from dit_accel.models.tiny_shapes import TINY_SHAPES_PLAN_PROMPTS
    from dit_accel.training.data import read_prompts

    return read_prompts(TINY_SHAPES_PLAN_PROMPTS)


def held_out_prompts() -> list:
    """8 prompts of the grammar outside the calibration file (every third of the 24 others, in grammar order): no
    `calibrate` run on that file searches or validates on them."""
    from dit_accel.models.clips import PROMPTS

    calibration = set(_calibration_prompts())
    return [p for p in PROMPTS if p not in calibration][::3][:8]


def _prompt_set(args) -> list:
    return held_out_prompts() if args.prompt_set == "held-out" else _calibration_prompts()


def _saved_run(path: str):
    """A ``--plans`` entry: a SparsePlan file, or a `dit-accel finetune --plan` folder (its plan with its LoRA).
    Returns ``(plan, weights folder or None)``."""
    from dit_accel.plans.sparse_plan import SparsePlan
    from dit_accel.checkpoints.finetuned import load_method

    if Path(path).is_dir():
        plan = load_method(path)
        if not isinstance(plan, SparsePlan):
            raise SystemExit(f"--plans {path}: a finetune folder trained under --method, not --plan; "
                             "run it with --method and --ft")
        return plan, path
    return SparsePlan.load(path), None


def _videos(pipe, prompts, seeds, call, method=None, dense_steps=0, ft=None, layer_methods=None) -> list:
    """Every prompt x seed (4 prompts per call), dense or under ``method`` (and ``layer_methods``) after
    ``dense_steps`` dense steps; ``dense_steps`` a tuple of step indices: those steps dense, the others under
    ``method`` (a plan of one phase per run of sparse steps); None: ``method`` is a SparsePlan, run as it is."""
    import contextlib

    import dit_accel

    videos = []
    for seed in seeds:
        for i in range(0, len(prompts), 4):
            chunk = prompts[i:i + 4]
            if method is None:
                applied = contextlib.nullcontext()
            elif dense_steps is None:  # a SparsePlan (--plans): its own dense steps, nothing added; ft: its LoRA
                applied = dit_accel.apply(pipe, method, weights=ft)
            elif isinstance(dense_steps, tuple):
                if ft or layer_methods:
                    raise SystemExit("a list of dense steps runs METHOD alone: drop --ft and --layer-methods")
                applied = dit_accel.apply(pipe, _steps_plan(method, dense_steps, call["num_inference_steps"]))
            else:
                applied = dit_accel.apply(pipe, method, dense_steps=dense_steps, weights=ft,
                                          layer_methods=layer_methods)
            with applied:
                videos += list(pipe(chunk, generator=[torch.Generator().manual_seed(seed) for _ in chunk],
                                    **call).frames)
    return videos


def _steps_plan(method, dense_steps: tuple, steps: int):
    """A SparsePlan running ``method`` on every layer at each step not in ``dense_steps``."""
    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    runs = []
    for step in (s for s in range(steps) if s not in dense_steps):
        if runs and runs[-1][1] == step:
            runs[-1][1] = step + 1
        else:
            runs.append([step, step + 1])
    return SparsePlan(phases=tuple(Phase(start=a, stop=b, default=method) for a, b in runs))


def _dense_steps(text: str):
    """``--dense-steps`` entries: ``N`` (the first N steps dense) or ``0,1,2,4`` (these steps dense)."""
    return tuple(int(x) for x in text.split(",")) if "," in text else int(text)


def sweep(args) -> None:
    from dit_accel.models.groundtruth import score_many, score_video
    from dit_accel.checkpoints.finetuned import method_from_dict

    if not args.plans and args.method is None:
        raise SystemExit("sweep: give --method JSON (with --dense-steps) or --plans FILE ...")
    if args.plans and (args.ft or args.layer_methods):
        raise SystemExit("--plans runs each plan as it is: drop --ft and --layer-methods")
    pipe, call = _pipe(args.weights, args.shift, args.device), _call(args)
    prompts = _prompt_set(args)
    names = [p for _ in args.seeds for p in prompts]
    start = time.perf_counter()
    dense = _videos(pipe, prompts, args.seeds, call)
    print(f"dense GT {score_many(dense, names)} {time.perf_counter() - start:.0f} s; per video (colour, shape, "
          f"motion, consistency): {[''.join(str(int(score_video(v, n)[k])) for k in KEYS) for v, n in zip(dense, names)]}",
          flush=True)
    if args.plans:
        runs = [(Path(f).name, *_saved_run(f), None) for f in args.plans]
    else:
        method = method_from_dict(json.loads(args.method))
        runs = [(f"{n} dense steps", method, args.ft, n) for n in args.dense_steps]
    layers = {int(k): method_from_dict(v) for k, v in json.loads(args.layer_methods).items()} \
        if args.layer_methods else None
    for label, method, ft, n in runs:
        start = time.perf_counter()
        sparse = _videos(pipe, prompts, args.seeds, call, method, n, ft, layers)
        db = [_clip_psnr(d, s) for d, s in zip(dense, sparse)]
        frame_db = [_frame_psnr(d, s) for d, s in zip(dense, sparse)]
        print(f"{label}: PSNR vs dense mean {np.mean(db):.1f} dB, worst {np.min(db):.1f} "
              f"[{' '.join(f'{x:.0f}' for x in db)}] (mean of per-frame PSNRs: {np.mean(frame_db):.2f}, worst "
              f"{np.min(frame_db):.2f}); sparse GT {score_many(sparse, names)} "
              f"{time.perf_counter() - start:.0f} s", flush=True)


def _tile_ids(grid, tile) -> torch.Tensor:
    """The tile of each token of ``grid`` in raster order (tiles numbered in raster order too)."""
    axes = [torch.arange(n) // t for n, t in zip(grid, tile)]
    counts = [-(-n // t) for n, t in zip(grid, tile)]
    t, h, w = torch.meshgrid(*axes, indexing="ij")
    return ((t * counts[1] + h) * counts[2] + w).flatten()


def _oracle_mass(p: torch.Tensor, tiles: torch.Tensor, keep: int) -> torch.Tensor:
    """Per head, the mean attention mass of a query inside the ``keep`` key tiles that hold the most mass for its
    query tile: what the best block selection at that density (SLA's or VSA's, chosen knowing the answer) keeps."""
    n = int(tiles.max()) + 1
    one_hot = torch.nn.functional.one_hot(tiles, n).to(p.dtype)  # tokens x tiles
    per_query = p @ one_hot  # heads x queries x key tiles
    per_tile = (one_hot.T @ per_query) / one_hot.sum(0)[:, None]  # heads x query tiles x key tiles
    chosen = per_tile.topk(keep, dim=-1).indices[:, tiles]  # heads x queries x keep
    return per_query.gather(-1, chosen).sum(-1).mean(-1)


def heads(args) -> None:
    import tempfile

    import dit_accel
    from dit_accel.patterns.tile import tile_mask

    pipe, call = _pipe(args.weights, device=args.device), _call(args)
    grid = ((args.frames - 1) // 2 + 1, args.size // 4, args.size // 4)
    tile = tuple(int(x) for x in args.tile.split(","))
    windows = tuple(tuple(w) for w in json.loads(args.windows)) if args.windows else (
        (1, 1, 1), (3, 1, 1), (1, 1, 3), (1, 3, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1))
    masks = {w: tile_mask(grid, tile, w) for w in windows}
    tiles = _tile_ids(grid, tile)
    num_tiles = int(tiles.max()) + 1
    keep = max(1, round(args.oracle_density * num_tiles))
    print(f"grid {grid}; per head: mass inside windows {' '.join('x'.join(map(str, w)) for w in windows)} "
          f"(their densities on the next line), then the most any {keep} key tiles per query tile keep (oracle)")
    print("densities: " + " ".join(f"{float(m.float().mean()):.3f}" for m in masks.values()) +
          f" oracle {keep / num_tiles:.3f}")
    with tempfile.TemporaryDirectory() as folder:
        with dit_accel.apply(pipe, dit_accel.Dense(), capture=folder, capture_steps=args.steps):
            pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call)
        for path in sorted(Path(folder).glob("*.pt")):
            data = torch.load(path, map_location="cpu")  # the masks are on the CPU
            q, k = data["q"][0].float(), data["k"][0].float()
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
            oracle = _oracle_mass(p, tiles, keep)
            cells = [" ".join(f"{float((p[h] * m).sum(-1).mean()):.2f}" for m in masks.values()) +
                     f" o{float(oracle[h]):.2f}" for h in range(p.shape[0])]
            print(f"layer {data['layer']} step {data['step']}: " + " | ".join(cells), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="check", required=True)
    for name in ("gt", "psnr", "sweep", "heads"):
        s = sub.add_parser(name)
        s.add_argument("--weights", required=True)
        s.add_argument("--frames", type=int, default=63)
        s.add_argument("--size", type=int, default=48, help="frame height and width in pixels")
        s.add_argument("--guidance", type=float, default=2.0)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--device", default="cpu", help="where the pipeline runs, e.g. cuda (default cpu)")
    sub.choices["gt"].add_argument("--seeds", type=int, nargs="+", default=[0])
    sub.choices["psnr"].add_argument("--prompts", nargs="+", default=["a red circle moving right"])
    sub.choices["psnr"].add_argument("--seed", type=int, default=0)
    sub.choices["psnr"].add_argument("--dense-steps", type=int, default=0)
    sub.choices["psnr"].add_argument("--method", default=None, metavar="JSON",
                                     help="the sparse method (default: the 63-frame per-head Tile windows)")
    sub.choices["sweep"].add_argument("--seeds", type=int, nargs="+", default=[0])
    sub.choices["sweep"].add_argument("--dense-steps", type=_dense_steps, nargs="+", default=[0, 1, 2],
                                      help="N (the first N steps dense) or a list of dense steps, e.g. 0,1,2,4,6")
    sub.choices["sweep"].add_argument("--method", default=None, metavar="JSON")
    sub.choices["sweep"].add_argument("--plans", nargs="+", default=None, metavar="FILE",
                                      help="saved SparsePlans, or `dit-accel finetune --plan` folders (the plan with "
                                           "its LoRA), to run instead of --method and --dense-steps")
    sub.choices["sweep"].add_argument("--prompt-set", choices=("calibration", "held-out"), default="calibration",
                                      help="the 8 calibration prompts, or 8 prompts outside that file")
    sub.choices["sweep"].add_argument("--ft", default=None, metavar="DIR", help="a `dit-accel finetune` folder")
    sub.choices["sweep"].add_argument("--shift", type=float, default=None,
                                      help="the sampler's shift instead of the saved one (tiny-shapes: 3)")
    sub.choices["sweep"].add_argument("--layer-methods", default=None, metavar="JSON",
                                      help='per layer, e.g. \'{"0": {"method": "tile", ...}}\' (apply\'s layer_methods)')
    sub.choices["heads"].add_argument("--prompt", default="a red circle moving right")
    sub.choices["heads"].add_argument("--steps", type=int, nargs="+", default=[0, 3, 6, 10])
    sub.choices["heads"].add_argument("--oracle-density", type=float, default=0.083,
                                      help="share of key tiles the oracle column keeps per query tile")
    sub.choices["heads"].add_argument("--tile", default="4,4,4", help="tile of the windows and the oracle (T,H,W)")
    sub.choices["heads"].add_argument("--windows", default=None, metavar="JSON",
                                      help="windows in tiles, e.g. '[[1,1,1],[3,1,1],[5,1,1]]' (default: seven "
                                           "bands and boxes of 4x4x4 tiles)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"gt": ground_truth, "psnr": psnr, "sweep": sweep, "heads": heads}[args.check](args)


if __name__ == "__main__":
    main()
