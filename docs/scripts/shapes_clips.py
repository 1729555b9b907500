"""Write tiny-shapes training clips as a caption folder for `dit-accel finetune --data` (BENCHMARKS.md section 8).

    python docs/scripts/shapes_clips.py OUT_DIR [--count 256] [--frames 63] [--seed 123]

Each clip is one of the grammar's objects (colour, shape, direction drawn at random) rendered by
`dit_accel.models.clips.render_batch` at 48x48, saved as a GIF, with its prompt in `metadata.jsonl`: the
Diffusers caption layout that `finetune --data` reads, so a distillation sees the latents of real clips rather than
Gaussian ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def write_clips(out, count: int = 256, frames: int = 63, seed: int = 123, size: int = 48) -> list:
    """Render ``count`` clips into ``out`` (created); returns the metadata rows written. ``metadata.jsonl``, which
    makes the folder a caption folder, goes last and whole: an earlier one is removed first, so a run stopped half-way
    leaves no folder that reads as good."""
    from dit_accel.atomic_files import atomic_write_text
    from dit_accel.models.clips import COLOURS, DIRECTIONS, SHAPES, make_prompt, render_batch
    from dit_accel.videos import save_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metadata.jsonl").unlink(missing_ok=True)
    g = torch.Generator().manual_seed(seed)
    colours, directions = list(COLOURS), list(DIRECTIONS)
    ids = [torch.randint(len(t), (count,), generator=g) for t in (colours, SHAPES, directions)]
    clips = render_batch(*ids, generator=g, frames=frames, height=size, width=size)
    rows = []
    for i, (c, s, d) in enumerate(zip(*(t.tolist() for t in ids))):
        name = f"clip{i:04d}.gif"
        save_video((clips[i].numpy() * 255).round().astype("uint8"), out / name, fps=8)
        rows.append({"file_name": name, "text": make_prompt(colours[c], SHAPES[s], directions[d])})
    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write (GIFs and metadata.jsonl)")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--frames", type=int, default=63)
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args(argv)
    rows = write_clips(args.out, args.count, args.frames, args.seed)
    print(f"wrote {len(rows)} clips of {args.frames} frames to {args.out}")


if __name__ == "__main__":
    main()
