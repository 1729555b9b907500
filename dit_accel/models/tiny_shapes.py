"""``tiny-shapes``: a small Wan video DiT trained by the project, shipped with the package.

A stock Diffusers :class:`~diffusers.WanPipeline` in Diffusers folder format
(``model_index.json`` + component folders, safetensors) under
:data:`TINY_SHAPES_DIR`, trained by :mod:`dit_accel.models.train_tiny` on the
clips of :mod:`dit_accel.models.clips`: one red, green, blue or yellow square or
circle moving left, right, up or down. Prompts: ``"a {colour} {shape} moving
{direction}"``. Every component is a stock Diffusers / Transformers class, so
``DiffusionPipeline.from_pretrained(TINY_SHAPES_DIR)`` works in any process:

- transformer: :class:`~diffusers.WanTransformer3DModel`, patch (1, 2, 2);
- text: a word-level tokenizer and a 2-layer :class:`~transformers.UMT5EncoderModel`
  trained with the transformer;
- vae: an :class:`~diffusers.AutoencoderKLWan` whose weights are set by hand to an
  exact pixel codec (no training): 2x2 average pooling and pairs of frames packed
  into channels (latent frame 0 = frame 0 twice, latent frame t = frames 2t-1 and 2t),
  so its scale factors are 2 (time) and 2 (space) and any odd frame count works.
  The decoder upsamples with nearest neighbours: details finer than 2x2 pixels do not exist;
- scheduler: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` (velocity prediction).

At :data:`TINY_SHAPES_DEFAULTS` (7 frames, 48x48) the latent is (4, 24, 24) and the
token grid (4, 12, 12): 576 video tokens, nine 64-token blocks. Larger sizes work
(any odd frame count, sides that are multiples of 16) for timing, but the model
only saw the default size.

``tiny-shapes-long`` (:data:`TINY_SHAPES_LONG_DIR`) is the same model fine-tuned to 31-frame clips: token grid
(16, 12, 12), 2,304 video tokens. ``tiny-shapes-63`` (``dit-accel generate``'s default) is ``tiny-shapes-long``
fine-tuned on to 63-frame clips: token grid (32, 12, 12), 4,608 video tokens. :data:`SHAPES_MODELS` holds what the
commands need to run each (call settings, grid, method settings, calibrated plan and, for ``tiny-shapes-63``, the
LoRA trained under it).

Example::

    from dit_accel.models.tiny_shapes import TINY_SHAPES_DEFAULTS, load_tiny_shapes
    pipe = load_tiny_shapes()
    frames = pipe("a red circle moving left", **TINY_SHAPES_DEFAULTS).frames[0]   # (7, 48, 48, 3) in [0, 1]
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["ShapesModel", "SHAPES_MODELS", "shapes_model",
           "TINY_SHAPES_DIR", "TINY_SHAPES_DEFAULTS", "TINY_SHAPES_LABEL", "TINY_SHAPES_METHOD", "TINY_SHAPES_METHODS",
           "TINY_SHAPES_PLAN", "TINY_SHAPES_PLAN_PROMPTS", "TINY_SHAPES_PLAN_COMMAND",
           "TINY_SHAPES_PROMPT", "TINY_SHAPES_GRID", "TINY_SHAPES_LONG_DIR", "TINY_SHAPES_LONG_DEFAULTS",
           "TINY_SHAPES_LONG_GRID", "TINY_SHAPES_LONG_METHODS", "TINY_SHAPES_LONG_PLAN", "TINY_SHAPES_63_DIR",
           "TINY_SHAPES_63_PLAN", "TINY_SHAPES_63_LORA", "TRAINED_MODELS", "balanced_prompts", "load_tiny_shapes",
           "evaluate"]

TINY_SHAPES_DIR = Path(__file__).resolve().parent / "weights" / "tiny-shapes"
TINY_SHAPES_LABEL = "tiny model trained on synthetic clips (coloured shapes)"
TINY_SHAPES_PROMPT = "a red circle moving right"  # `dit-accel generate`'s prompt for this model
# Call settings of the shipped model: the training size, and the steps and guidance that evaluate() scored
# best on seeds 0-1 and confirmed on seeds 2-3 (guidance 2 vs 4 there: shape 0.86 vs 0.73).
TINY_SHAPES_DEFAULTS = {
    "num_frames": 7,
    "height": 48,
    "width": 48,
    "num_inference_steps": 12,
    "guidance_scale": 2.0,
    "max_sequence_length": 16,
}
# Method settings sized to the default token grid (4, 12, 12) = 576 tokens = nine 64-token blocks
# (3 x 3 spatial tiles of 4x4x4 tokens per latent clip). Densities are visited 64x64 blocks of
# video-video attention on that grid (`python -m dit_accel.models.tiny_shapes --densities`).
TINY_SHAPES_GRID = (4, 12, 12)  # token grid at TINY_SHAPES_DEFAULTS
TINY_SHAPES_METHOD = "sla"  # the uniform method `dit-accel generate` runs when the shipped plan does not fit the call
# `dit-accel generate`'s default on this model: a plan made by `dit-accel calibrate` (with validation on held-out
# prompts) from the prompts file beside it, for TINY_SHAPES_DEFAULTS. Remade by TINY_SHAPES_PLAN_COMMAND.
TINY_SHAPES_PLAN = Path(__file__).resolve().parent / "plans" / "tiny-shapes.json"
TINY_SHAPES_PLAN_PROMPTS = TINY_SHAPES_PLAN.with_name("tiny-shapes.prompts.txt")
TINY_SHAPES_PLAN_COMMAND = ("dit-accel calibrate --model tiny-shapes --prompts dit_accel/models/plans/tiny-shapes.prompts.txt "
                            "--min-psnr 30 --out dit_accel/models/plans/tiny-shapes.json "
                            "--report-dir docs/calibrate_evidence/tiny-shapes-shipped")
TINY_SHAPES_METHODS = {
    # Tiles of 4x4x4 tokens, each sees its own row of tiles: density 3/9 = 0.333.
    "tile": {"tile": (4, 4, 4), "window": (1, 1, 3)},
    # Neighbourhood of 4x8x8 tokens, block-sparse through 4x4x4 tiles: density 0.605 (the least GNA
    # reaches here with stride 1: a 3x3 tile grid leaves no tile more than one step from the edge).
    "gna": {"kernel_size": (4, 8, 8), "tile": (4, 4, 4)},
    # Radial's temporal decay needs many frames; on 4 latent frames it keeps 0.951 of the blocks.
    "radial": {"block_size": 64, "decay": 1.0, "sink_frames": (0,)},
    "sla": {"topk": 0.3},  # 3 of 9 key blocks per query block for exact softmax, the rest linear
}


# tiny-shapes-long: tiny-shapes fine-tuned by train_tiny to 31-frame clips (docs/models.md has the commands): latent
# (16, 24, 24), token grid (16, 12, 12) = 2,304 video tokens, where attention is most of the transformer's time on a
# CPU. A frame is one 144-token tile: Tile's blocks there are whole frames (Tile.block_size).
TINY_SHAPES_LONG_DIR = TINY_SHAPES_DIR.with_name("tiny-shapes-long")
TINY_SHAPES_LONG_DEFAULTS = {**TINY_SHAPES_DEFAULTS, "num_frames": 31}
TINY_SHAPES_LONG_GRID = (16, 12, 12)
TINY_SHAPES_LONG_METHODS = {
    # Each frame with the frames beside it (the window slides in at the ends): 3 of 16 frames, density 0.188.
    "tile": {"tile": (1, 12, 12), "window": (3, 1, 1), "block_size": 144},
    # NATTEN's neighbourhood of 3 whole frames: density 0.188.
    "gna": {"kernel_size": (3, 12, 12)},
    # Radial's temporal decay on 64-token blocks: density 0.671.
    "radial": {"block_size": 64, "decay": 1.0, "sink_frames": (0,)},
    "sla": {"topk": 0.2},  # 8 of 36 key blocks per query block for exact softmax, the rest linear
}
TINY_SHAPES_LONG_PLAN = TINY_SHAPES_PLAN.with_name("tiny-shapes-long.json")
TINY_SHAPES_LONG_PLAN_COMMAND = (
    "dit-accel calibrate --model tiny-shapes-long --prompts dit_accel/models/plans/tiny-shapes.prompts.txt "
    "--tile 1,12,12 --costs measured --search warmup --min-psnr 31 --seeds 0 --validate 4 "
    "--out dit_accel/models/plans/tiny-shapes-long.json "
    "--report-dir docs/calibrate_evidence/tiny-shapes-long-shipped")

# tiny-shapes-63: tiny-shapes-long fine-tuned on to 63-frame clips on a GPU (docs/models.md has the commands): latent
# (32, 24, 24), token grid (32, 12, 12) = 4,608 video tokens. Its methods keep the frame windows of tiny-shapes-long,
# so their densities halve: 3 of 32 frames.
TINY_SHAPES_63_DIR = TINY_SHAPES_DIR.with_name("tiny-shapes-63")
# Its plan: calibrate's cheapest plan whose mean PSNR held 27.5 dB on the search and the validation videos (2 dense
# steps, one bridge step of Tile over 17 of 32 frames, then Tile over 3 of 32), shipped with the sparse-aware LoRA
# trained under it (TINY_SHAPES_63_LORA: `finetune --plan --mode distill`, 108 steps on the 2-core CPU), which lifts
# it over 30 dB (docs/models.md).
TINY_SHAPES_63_PLAN = TINY_SHAPES_PLAN.with_name("tiny-shapes-63.json")
TINY_SHAPES_63_PLAN_COMMAND = (
    "dit-accel calibrate --model tiny-shapes-63 --prompts dit_accel/models/plans/tiny-shapes.prompts.txt "
    "--tile 1,12,12 --costs measured --search warmup --budget-on mean --min-psnr 27.5 --seeds 0 --validate 4 "
    "--out dit_accel/models/plans/tiny-shapes-63.json "
    "--report-dir docs/calibrate_evidence/tiny-shapes-63-shipped")
TINY_SHAPES_63_LORA = TINY_SHAPES_PLAN.with_name("tiny-shapes-63-lora")


@dataclass(frozen=True)
class ShapesModel:
    """A model trained by the project on the shapes clips (:mod:`dit_accel.models.clips`) and shipped in the
    package: what ``generate``, ``eval``, ``calibrate`` and ``info`` need to run it at its size.

    Attributes:
        name: its ``--model`` name.
        folder: the Diffusers folder inside the package.
        summary: one line for ``dit-accel info``.
        defaults: the call settings it was trained and scored at.
        grid: the token grid at ``defaults``.
        methods: method options sized to ``grid`` (``generate --method NAME`` and ``eval`` use them).
        uniform: the method ``generate`` runs when the shipped plan does not fit the call.
        plan: the calibrated plan ``generate`` runs by default (``dit-accel calibrate``, validated).
        plan_command: the command that remade ``plan``.
        threads: torch threads ``generate`` uses on a CPU (unless ``OMP_NUM_THREADS`` is set); None: PyTorch's
            default (every core). At hundreds of tokens one thread is fastest: the operations are too small to split.
        schedule: ``apply`` arguments that go with ``methods`` unless flags set them (e.g. ``dense_steps``).
        plan_weights: a ``finetune --plan`` folder (a sparse-aware LoRA) trained under ``plan``'s content, which
            ``generate`` loads with the plan by default; None: the plan runs on the model as it is.
    """

    name: str
    folder: Path
    summary: str
    defaults: dict
    grid: tuple
    methods: dict
    uniform: str
    plan: Optional[Path]
    plan_command: str = ""
    threads: Optional[int] = 1
    schedule: dict = field(default_factory=dict)
    plan_weights: Optional[Path] = None
    label: str = TINY_SHAPES_LABEL
    prompt: str = TINY_SHAPES_PROMPT

    def owner(self) -> str:
        """``"tiny-shapes'"`` (``"tiny-clip's"`` for a name without a final s): the name as an owner, for messages."""
        return self.name + ("'" if self.name.endswith("s") else "'s")

    def fallback(self) -> str:
        """What ``generate`` runs at another call than the plan's: ``"SLA"``, ``"Tile after 7 dense steps"``."""
        from ..methods import registered_methods

        name = registered_methods()[self.uniform].cls.__name__
        steps = self.schedule.get("dense_steps")
        return f"{name} after {steps} dense steps" if steps else name

    def size(self) -> str:
        """``"7 frames at 48x48"``."""
        d = self.defaults
        return f"{d['num_frames']} frames at {d['height']}x{d['width']}"


SHAPES_MODELS = {
    "tiny-shapes": ShapesModel(
        name="tiny-shapes", folder=TINY_SHAPES_DIR,
        summary=f"WanPipeline with a 4-layer WanTransformer3DModel (~1 M parameters); {TINY_SHAPES_LABEL}: "
                "'a {red|green|blue|yellow} {square|circle} moving {left|right|up|down}', 7 frames at 48x48, offline",
        defaults=TINY_SHAPES_DEFAULTS, grid=TINY_SHAPES_GRID, methods=TINY_SHAPES_METHODS, uniform=TINY_SHAPES_METHOD,
        plan=TINY_SHAPES_PLAN, plan_command=TINY_SHAPES_PLAN_COMMAND),
    "tiny-shapes-long": ShapesModel(
        name="tiny-shapes-long", folder=TINY_SHAPES_LONG_DIR,
        summary=f"tiny-shapes fine-tuned to long clips (2,304 video tokens); {TINY_SHAPES_LABEL}: same prompts, "
                "31 frames at 48x48, offline",
        defaults=TINY_SHAPES_LONG_DEFAULTS, grid=TINY_SHAPES_LONG_GRID, methods=TINY_SHAPES_LONG_METHODS,
        uniform="tile", plan=TINY_SHAPES_LONG_PLAN, plan_command=TINY_SHAPES_LONG_PLAN_COMMAND,
        threads=None,  # 2,304 tokens: every core helps
        # Sparse from the first step, Tile's frame window loses the object (18 dB against dense, motion and
        # consistency fail on the README prompt): its methods start after the 7 dense steps its plan starts with.
        schedule={"dense_steps": 7}),
    "tiny-shapes-63": ShapesModel(
        name="tiny-shapes-63", folder=TINY_SHAPES_63_DIR,
        summary=f"tiny-shapes-long fine-tuned to longer clips (4,608 video tokens); {TINY_SHAPES_LABEL}: same "
                "prompts, 63 frames at 48x48, offline",
        defaults={**TINY_SHAPES_DEFAULTS, "num_frames": 63}, grid=(32, 12, 12),
        # tiny-shapes-long's frame windows (Tile, GNA: 3 of 32 frames here, density 0.094; Radial: its least on this
        # grid, 0.470), and SLA at their density: 7 of 72 key blocks per query block exact (0.097), the rest linear.
        methods={**TINY_SHAPES_LONG_METHODS, "sla": {"topk": 0.09}},
        uniform="tile", plan=TINY_SHAPES_63_PLAN, plan_command=TINY_SHAPES_63_PLAN_COMMAND, threads=None,
        plan_weights=TINY_SHAPES_63_LORA,
        # At other calls Tile runs without the LoRA, after the 6 dense steps with which calibrate's stricter budget
        # (31 dB on every video, docs/calibrate_evidence/tiny-shapes-63-6-dense-steps) kept every video over 31 dB.
        schedule={"dense_steps": 6}),
}

# Embedded trained models: name -> Diffusers folder inside the package (loaded like any local folder).
TRAINED_MODELS = {name: m.folder for name, m in SHAPES_MODELS.items()}


def shapes_model(name) -> Optional[ShapesModel]:
    """The shipped shapes model called ``name`` (``"tiny-shapes"``, ...), or None for any other model."""
    return SHAPES_MODELS.get(name) if isinstance(name, str) else None


def balanced_prompts(n: int = 8) -> list:
    """``n`` prompts (``n`` a multiple of 4, at most 32) in which every colour and every direction
    appears ``n / 4`` times and every direction with both shapes (from ``n = 8``): a cheap cover of the
    grammar for checks and ``dit-accel eval``.

    Example::

        balanced_prompts(4)   # ['a red square moving left', 'a red circle moving right', 'a green square moving up', ...]
    """
    from .clips import COLOURS, DIRECTIONS, SHAPES, make_prompt

    from .._util import is_int

    if not is_int(n) or n % 4 or not 4 <= n <= 32:  # (before: "8" or 8.0 a raw TypeError of the arithmetic)
        raise ValueError(f"n={n!r} is invalid: a multiple of 4 from 4 to 32")
    colours, directions = list(COLOURS), list(DIRECTIONS)
    out = []
    for i in range(n):
        # colour and direction cycle at different rates; the shape flips with the direction and every 4th prompt.
        colour = colours[(i // 2 + i // 8) % 4]
        out.append(make_prompt(colour, SHAPES[(i + i // 4) % 2], directions[i % 4]))
    if len(set(out)) != n:  # pragma: no cover - the arithmetic above makes them distinct
        raise AssertionError(out)
    return out


def load_tiny_shapes(device="cpu", dtype=None):
    """Load the shipped ``tiny-shapes`` pipeline from :data:`TINY_SHAPES_DIR` (offline, ~1 s).

    Returns:
        a :class:`diffusers.WanPipeline` on ``device`` with weights in ``dtype`` (default float32).

    Example::

        pipe = load_tiny_shapes()
        video = pipe("a blue square moving up", **TINY_SHAPES_DEFAULTS).frames[0]
    """
    import warnings

    import torch
    from diffusers import DiffusionPipeline

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        # (before: Diffusers logged "Defaulting to torch.float32" and loaded fp32 weights where "bf16" was asked for)
        raise ValueError(f"dtype={dtype!r} is invalid: a floating torch.dtype such as torch.bfloat16 (None: float32); "
                         "load_pipeline('tiny-shapes', dtype='bf16') takes a dtype's name too")
    if not (TINY_SHAPES_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the tiny-shapes weights are missing from {TINY_SHAPES_DIR}; reinstall dit-accel "
                                "or retrain them with `python -m dit_accel.models.train_tiny`")
    with warnings.catch_warnings():
        # Newer Diffusers renamed torch_dtype to dtype; the old name works across the supported versions.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(TINY_SHAPES_DIR), torch_dtype=dtype or torch.float32,
                                                 local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def evaluate(pipe=None, prompts=None, seeds=(0, 1), batch_size: int = 8, **call_kwargs) -> dict:
    """Generate every prompt x seed with the stock pipeline call and score it with
    :func:`dit_accel.models.groundtruth.score_many`.

    Args:
        pipe: a ``tiny-shapes`` pipeline (default: :func:`load_tiny_shapes`).
        prompts: default all 32 of :data:`dit_accel.models.clips.PROMPTS`.
        seeds: one ``torch.Generator`` seed per sample; the noise of a sample does
            not depend on the batch it runs in.
        batch_size: prompts per pipeline call.
        call_kwargs: override :data:`TINY_SHAPES_DEFAULTS` (e.g. ``num_inference_steps=8``).

    Returns:
        the accuracies of ``score_many`` plus ``seconds_per_sample`` (wall time of the
        pipeline calls / samples) and the call settings used.

    Example::

        evaluate(seeds=(0, 1))   # {"colour": 1.0, "shape": 0.9, ..., "seconds_per_sample": 0.4}
    """
    import torch

    from .groundtruth import score_many
    from .clips import PROMPTS

    prompts, seeds = _checked_jobs(prompts or PROMPTS, seeds, batch_size)
    pipe = pipe if pipe is not None else load_tiny_shapes()
    settings = {**TINY_SHAPES_DEFAULTS, **call_kwargs}
    jobs = [(p, s) for s in seeds for p in prompts]
    videos, seconds = [], 0.0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        start = time.perf_counter()
        out = pipe(prompt=[p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                   output_type="np", **settings)
        seconds += time.perf_counter() - start
        videos.extend(out.frames)
    result = score_many(videos, [p for p, _ in jobs])
    result["seconds_per_sample"] = seconds / len(jobs)
    result["settings"] = settings
    return result


def _checked_jobs(prompts, seeds, batch_size) -> tuple:
    """``(prompts, seeds)`` of :func:`evaluate` as lists, checked before anything is generated: a ValueError naming
    the argument. Before: one prompt string was taken letter by letter (one video per character), a prompt off the
    grammar was refused only after every video was made, and ``batch_size=0`` was a raw ``range()`` error."""
    from .._util import is_int
    from .groundtruth import parse_prompt

    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts={prompts!r} is invalid: a non-empty list of prompts such as "
                         f"[{TINY_SHAPES_PROMPT!r}] (None: all 32)")
    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except ValueError as err:
            raise ValueError(f"prompts[{i}]: {err} (the videos are scored against the prompt's colour, shape and "
                             "direction)") from None
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range)) or not seeds \
            or not all(is_int(s) and s >= 0 for s in seeds):
        raise ValueError(f"seeds={seeds!r} is invalid: a non-empty list of whole numbers >= 0, e.g. (0, 1)")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: the prompts per pipeline call, a whole number >= 1")
    return list(prompts), [int(s) for s in seeds]


def main(argv=None) -> None:
    """``python -m dit_accel.models.tiny_shapes [--seeds 0 1] [--steps N]``: evaluate the shipped model."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the shipped setting)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the shipped setting)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance)) if v is not None}
    print(json.dumps(evaluate(seeds=tuple(args.seeds), **overrides), indent=2))


if __name__ == "__main__":
    main()
