"""Tiny random-weight Diffusers pipelines and transformers for offline smoke runs and tests.

``build_tiny_pipeline("tiny-wan")`` returns a real :class:`diffusers.WanPipeline`
(``"tiny-flux"``: :class:`diffusers.FluxPipeline`; also ``tiny-skyreels-v2``, ``tiny-wan-vace``,
``tiny-sd3``, ``tiny-chroma``, ``tiny-cogview4``, ``tiny-qwenimage``, ``tiny-flux2``: see
:data:`TINY_MODELS`) whose transformer, VAE and
text encoders are a few thousand parameters built from configs, with weights
drawn from a fixed seed and tokenizers built in code. Nothing is downloaded.
``build_tiny_transformer("hunyuan")`` builds one bare transformer of every
supported class, and ``tiny_transformer_inputs`` its forward kwargs for a
chosen token grid: a forward pass takes milliseconds.

The weights are RANDOM: the videos are noise-like patterns. Use these models to
check that a command, a method or an integration runs end to end, never to
judge quality. Each family module documents its token grids at the suggested
sizes (``TINY_DEFAULTS``), big enough for sparse patterns with 64-token blocks
to skip work.

Layout: ``_common.py`` (:class:`TinyTransformer`, :class:`TinyPipeline`, tokenizers built in code),
one module per family (named like its ``pipelines/presets/<family>.py``), and this file: the registry.

Adding a model family (developer note)
--------------------------------------
1. Write ``models/tiny/<family>.py`` defining ``TRANSFORMERS = (TinyTransformer(name, class_name,
   config, grid=..., text=..., inputs=...),)``: a config of a few thousand parameters and an ``inputs``
   builder drawing every random tensor from ``rnd``; optionally ``PIPELINES = (TinyPipeline(...),)`` for a
   ``tiny-<family>`` pipeline (its name must contain a ``hub_words`` word of the family's preset).
   Import only from ``._common`` (never from this package: no cycles).
2. Add its module name to :data:`~dit_accel.models.families.FAMILIES` (once, for the presets too).
3. Nothing else: ``tests/pipelines/test_apply.py`` parametrizes over :data:`TRANSFORMER_NAMES` (dense
   and full-window runs reproduce dense; a sparse run matches the masked reference; ``remove`` restores),
   ``tests/pipelines/test_presets.py`` checks that every family module is registered, that every preset
   class has a tiny transformer in the module of the same name and that ``tiny-<family>`` resolves to it.
   A ``tiny-<family>`` pipeline also lists its weighted components in ``COMPONENTS`` of
   ``tests/models/test_tiny.py`` (the seed and cross-process determinism tests), its class and grid in
   ``PIPES`` of ``tests/models/test_tiny_pipelines.py`` (2-step run; sparse everywhere, ``Dense()``
   bit-exact) and a row of ``test_generate_tiny_family_pipeline_with_gna`` in ``tests/cli/test_cli.py``.
   Share components through ``._common`` (``tiny_wan_parts``, ``tiny_image_vae``, the tokenizers).
"""

from __future__ import annotations

import importlib
import numbers
from typing import Dict, Tuple

import torch

from ..families import FAMILIES
from ..tiny_shapes import SHAPES_MODELS
from ._common import TinyPipeline, TinyTransformer

__all__ = [
    "FAMILIES",
    "TinyTransformer",
    "TinyPipeline",
    "TRANSFORMERS",
    "TRANSFORMER_NAMES",
    "TRANSFORMER_GRIDS",
    "TRANSFORMER_TEXT",
    "build_tiny_transformer",
    "tiny_transformer_inputs",
    "PIPELINES",
    "TINY_MODELS",
    "TINY_DEFAULTS",
    "TINY_METHOD_DEFAULTS",
    "RANDOM_WEIGHTS_LABEL",
    "EMBEDDED_MODELS",
    "build_tiny_pipeline",
    "is_tiny_model",
    "is_embedded_model",
    "model_label",
    "as_dtype",
]

_MODULES = tuple(importlib.import_module(f"{__name__}.{name}") for name in FAMILIES)

# ----------------------------------------------------------------------------- bare transformers
# One tiny transformer of every supported class, by short name.
TRANSFORMERS: Dict[str, TinyTransformer] = {t.name: t for m in _MODULES for t in m.TRANSFORMERS}
TRANSFORMER_NAMES: Tuple[str, ...] = tuple(TRANSFORMERS)
TRANSFORMER_GRIDS = {name: t.grid for name, t in TRANSFORMERS.items()}  # default token grids
TRANSFORMER_TEXT = {name: t.text for name, t in TRANSFORMERS.items()}  # default text tokens

# ----------------------------------------------------------------------------- pipelines
# tiny-wan and tiny-flux (the first two, the examples everywhere) first, then by name: the order `info` lists.
PIPELINES: Dict[str, TinyPipeline] = {
    p.name: p for p in sorted((p for m in _MODULES for p in getattr(m, "PIPELINES", ())),
                              key=lambda p: (p.name not in ("tiny-wan", "tiny-flux"), p.name != "tiny-wan", p.name))}

RANDOM_WEIGHTS_LABEL = "random weights (tiny model for smoke runs; the output is noise, not a real video or image)"

TINY_MODELS = {name: p.summary for name, p in PIPELINES.items()}

# Suggested call settings: small enough for a 2-core CPU, big enough for sparsity.
TINY_DEFAULTS = {name: dict(p.defaults) for name, p in PIPELINES.items()}

# Method settings scaled to the tiny grids (the paper presets assume grids like
# (21, 30, 52) and 50 steps; on (5, 8, 8) they would be dense or invalid).
TINY_METHOD_DEFAULTS = {name: {m: dict(o) for m, o in p.method_defaults.items()} for name, p in PIPELINES.items()}

# The trained shapes models (Diffusers folders in the package, see tiny_shapes.py) share the
# tables above: call settings and grid-sized method options by name.
for _name, _model in SHAPES_MODELS.items():
    TINY_DEFAULTS[_name] = dict(_model.defaults)
    TINY_METHOD_DEFAULTS[_name] = {name: dict(options) for name, options in _model.methods.items()}

# Every model that ships with the package, by --model name: trained first (the default of generate).
EMBEDDED_MODELS = {
    **{name: m.summary for name, m in SHAPES_MODELS.items()},
    **TINY_MODELS,
}


def is_tiny_model(name) -> bool:
    """A random-weight tiny model built in code (``tiny-wan``, ``tiny-flux``)."""
    return isinstance(name, str) and name in TINY_MODELS


def is_embedded_model(name) -> bool:
    """A model shipped with the package (random-weight tiny models and the trained shapes models): it has
    grid-sized call settings and method options in :data:`TINY_DEFAULTS` / :data:`TINY_METHOD_DEFAULTS`."""
    return isinstance(name, str) and name in EMBEDDED_MODELS


def model_label(name) -> str | None:
    """What an embedded model's output is, for the user: the random-weight warning or the trained label."""
    if is_tiny_model(name):
        return RANDOM_WEIGHTS_LABEL
    model = SHAPES_MODELS.get(name) if isinstance(name, str) else None
    return model.label if model is not None else None


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(dtype) -> torch.dtype:
    """``dtype`` as a floating torch.dtype: a torch.dtype, or its name as Diffusers users write it (``"bf16"``,
    ``"float16"``, ``"torch.bfloat16"``); None is float32. ValueError for anything else: a string reached
    ``pipe.to`` as a bare TypeError (tiny models), or Diffusers' ``from_pretrained`` logged "Defaulting to
    torch.float32" and loaded fp32 weights where fp16 were asked for (folders and hub ids)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is invalid: the weight dtype, a floating torch.dtype (torch.bfloat16) or its "
                     f"name ({', '.join(repr(n) for n in _DTYPE_NAMES)}); 'auto' is not taken: give the dtype")


def build_tiny_pipeline(name: str, *, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """Build an embedded tiny pipeline with random weights (no download).

    Args:
        name: ``"tiny-wan"``, ``"tiny-flux"``, ... (see :data:`TINY_MODELS`).
        seed: weight seed; the same seed gives bit-identical weights every time.
            The global torch RNG state is left untouched.
        device, dtype: where the pipeline's modules live.

    Example::

        pipe = build_tiny_pipeline("tiny-wan")
        frames = pipe("a cat", num_frames=17, height=128, width=128,
                      num_inference_steps=4, max_sequence_length=32).frames[0]
    """
    if name not in PIPELINES:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    dtype = as_dtype(dtype)
    # fork_rng: weight init draws from the global generator; do not disturb the caller's stream.
    # Builders seed after their imports: a first-time import may itself draw random numbers.
    with torch.random.fork_rng(devices=[]):
        pipe = PIPELINES[name].build(seed)
    if dtype == torch.float32:
        pipe.to(device=device)
    else:
        # Diffusers warns that some modules "should be kept in float32" on a plain cast;
        # tiny models have no such checkpoint convention, so silence that one warning.
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            pipe.to(device=device, dtype=dtype)
        finally:
            dlog.set_verbosity(level)
    pipe.set_progress_bar_config(leave=False)
    return pipe


def build_tiny_transformer(name: str, seed: int = 0):
    """An fp32 eval-mode transformer of class ``name`` (see :data:`TRANSFORMER_NAMES`), random weights.

    Output layers that the config initialises to zero get random values too, so every block
    affects the result (a zero output layer would hide an attention bug).
    """
    import diffusers

    if name not in TRANSFORMERS:
        raise ValueError(f"unknown tiny transformer {name!r}; choose one of {TRANSFORMER_NAMES}")
    _check_seed(seed)
    entry = TRANSFORMERS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, entry.class_name)(**entry.config)
        # Random (not zero-initialised) output layers so every block affects the result.
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
        if entry.tune is not None:
            with torch.no_grad():
                entry.tune(model)
    return model.eval()


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_seed(seed) -> None:
    """(a str or float seed failed in torch as "invalid literal for int()" or "manual_seed expected a long")"""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} is invalid: the random seed, an int")


def tiny_transformer_inputs(name: str, model, grid=None, batch: int = 1, text: int = None, seed: int = 1,
                            text_valid=None):
    """Forward kwargs for ``model`` whose latent has token grid ``grid``.

    ``batch`` samples of ``text`` text tokens (None: the family's default, :data:`TRANSFORMER_TEXT`); ``text_valid``:
    per-sample valid text lengths, 1 to ``text`` (HunyuanVideo/Mochi padding masks). ValueError for other values.
    """
    if name not in TRANSFORMERS:
        raise ValueError(f"unknown tiny transformer {name!r}; choose one of {TRANSFORMER_NAMES}")
    entry = TRANSFORMERS[name]
    grid = entry.grid if grid is None else grid
    # (a grid of another rank failed in the family's builder as a bare unpacking error)
    if not (isinstance(grid, (tuple, list)) and len(grid) == len(entry.grid) and all(map(_positive_int, grid))):
        raise ValueError(f"grid={grid!r} is invalid for tiny {name!r}: {len(entry.grid)} positive ints (its token grid "
                         f"after the patch, e.g. {entry.grid})")
    # (text=0 quietly gave the default length, batch=0 an empty call, a negative one a bare RuntimeError; a valid
    # length past the text or below 0 was sliced quietly: [9] of 6 tokens all valid, [-1] five of them)
    if not _positive_int(batch):
        raise ValueError(f"batch={batch!r} is invalid: the number of samples, a positive int")
    if text is not None and not _positive_int(text):
        raise ValueError(f"text={text!r} is invalid: the number of text tokens, a positive int (None: {entry.text})")
    text = entry.text if text is None else text
    if text_valid is not None and (isinstance(text_valid, (str, bytes)) or not hasattr(text_valid, "__len__")
                                   or len(text_valid) != batch
                                   or not all(_positive_int(n) and n <= text for n in text_valid)):
        raise ValueError(f"text_valid={text_valid!r} is invalid: one valid text length per sample ({batch}), each "
                         f"from 1 to the text tokens ({text})")
    _check_seed(seed)
    grid = tuple(grid)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    t = torch.full((batch,), 500.0)
    mask = torch.ones(batch, text, dtype=torch.long)
    if text_valid is not None:
        for b, n in enumerate(text_valid):
            mask[b, n:] = 0
    return entry.inputs(model.config, grid, batch, text, rnd, t, mask)
