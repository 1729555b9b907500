"""Quick checks of a long-clip checkpoint of tiny-shapes (issue 45, BENCHMARKS.md section 8).

    # dense ground truth of the 8 calibration prompts x seeds at 63 frames (batches of 4 prompts)
    python docs/scripts/long_clip_checks.py gt --weights DIR --guidance 2.0 --seeds 0
    # PSNR of the per-head Tile windows of `train_tiny --local` against dense, first N steps dense, and both GTs
    python docs/scripts/long_clip_checks.py psnr --weights DIR --prompts "a red circle moving right" --dense-steps 4
    # the same at 7 frames of 128x128 under another method
    python docs/scripts/long_clip_checks.py psnr --weights DIR --frames 7 --size 128 --method '{"method": "tile", ...}'

Both run the stock pipeline call (12 steps, max_sequence_length 16; 48x48 unless --size) on the CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = Path(__file__).resolve().parents[2] / "dit_accel" / "models" / "plans" / "tiny-shapes.prompts.txt"
WINDOWS = ((3, 1, 3), (3, 1, 3), (3, 3, 1), (3, 3, 1))  # heads 0-1: a row band, heads 2-3: a column band
KEYS = ("colour_ok", "shape_ok", "motion_ok", "consistent")


def _pipe(folder: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(args) -> dict:
    return dict(num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=12, guidance_scale=args.guidance,
                max_sequence_length=16, output_type="np")


def ground_truth(args) -> None:
    from dit_accel.models.groundtruth import score_many

    pipe = _pipe(args.weights)
    prompts = [x.strip() for x in PROMPTS.read_text().splitlines() if x.strip() and not x.startswith("#")]
    videos, names, start = [], [], time.perf_counter()
    for seed in args.seeds:
        for i in range(0, len(prompts), 4):
            chunk = prompts[i:i + 4]
            out = pipe(chunk, generator=[torch.Generator().manual_seed(seed) for _ in chunk], **_call(args)).frames
            videos += list(out)
            names += chunk
    print(f"guidance {args.guidance} seeds {args.seeds}: {score_many(videos, names)} "
          f"{time.perf_counter() - start:.0f}s", flush=True)


def psnr(args) -> None:
    import dit_accel
    from dit_accel.models.groundtruth import score_video

    pipe = _pipe(args.weights)
    from dit_accel.weights import method_from_dict

    method = method_from_dict(json.loads(args.method)) if args.method else dit_accel.Tile(tile=(4, 4, 4), window=WINDOWS)
    for prompt in args.prompts:
        start = time.perf_counter()
        dense = pipe(prompt, generator=torch.Generator().manual_seed(args.seed), **_call(args)).frames[0]
        t_dense = time.perf_counter() - start
        with dit_accel.apply(pipe, method, dense_steps=args.dense_steps):
            start = time.perf_counter()
            sparse = pipe(prompt, generator=torch.Generator().manual_seed(args.seed), **_call(args)).frames[0]
            t_sparse = time.perf_counter() - start
        mse = float(((dense - sparse) ** 2).mean())
        db = 10 * np.log10(1 / mse) if mse > 0 else 100.0
        gd, gs = score_video(dense, prompt), score_video(sparse, prompt)
        print(f"{prompt!r} seed {args.seed}, {args.dense_steps} dense steps: PSNR {db:.1f} dB; dense GT "
              f"{[bool(gd[k]) for k in KEYS]}, sparse GT {[bool(gs[k]) for k in KEYS]}; "
              f"{t_dense:.1f} s vs {t_sparse:.1f} s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="check", required=True)
    for name in ("gt", "psnr"):
        s = sub.add_parser(name)
        s.add_argument("--weights", required=True)
        s.add_argument("--frames", type=int, default=63)
        s.add_argument("--size", type=int, default=48, help="frame height and width in pixels")
        s.add_argument("--guidance", type=float, default=2.0)
        s.add_argument("--threads", type=int, default=2)
    sub.choices["gt"].add_argument("--seeds", type=int, nargs="+", default=[0])
    sub.choices["psnr"].add_argument("--prompts", nargs="+", default=["a red circle moving right"])
    sub.choices["psnr"].add_argument("--seed", type=int, default=0)
    sub.choices["psnr"].add_argument("--dense-steps", type=int, default=0)
    sub.choices["psnr"].add_argument("--method", default=None, metavar="JSON",
                                     help="the sparse method (default: the 63-frame per-head Tile windows)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (ground_truth if args.check == "gt" else psnr)(args)


if __name__ == "__main__":
    main()
