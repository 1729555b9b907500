"""Dense ground truth of a tiny-shapes-like pipeline at a clip length it may not have been trained for (issue 45).

    python docs/scripts/long_clip_groundtruth.py --weights outputs/long-clip --frames 31 --prompts 4 --seeds 0 1

Runs :func:`dit_accel.models.tiny_shapes.evaluate` (the stock pipeline call at the shipped settings, 12 steps,
guidance 2.0, 48x48) on ``balanced_prompts(N)`` x seeds with ``num_frames`` replaced; prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch


def main(argv=None) -> None:
    from diffusers import DiffusionPipeline

    from dit_accel.models.tiny_shapes import TINY_SHAPES_DIR, balanced_prompts, evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(TINY_SHAPES_DIR))
    p.add_argument("--frames", type=int, default=31)
    p.add_argument("--prompts", type=int, default=4, help="balanced_prompts(N)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(args.weights, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    load = [os.getloadavg()]
    result = evaluate(pipe, prompts=balanced_prompts(args.prompts), seeds=tuple(args.seeds), batch_size=4,
                      num_frames=args.frames)
    load.append(os.getloadavg())
    print(json.dumps({"weights": args.weights, "frames": args.frames, "prompts": balanced_prompts(args.prompts),
                      "seeds": args.seeds, "loadavg_start_end": load, **result}))


if __name__ == "__main__":
    main()
