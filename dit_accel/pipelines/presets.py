"""Per-model knowledge as data: one :class:`Preset` per supported transformer class.

A preset says which attention modules hold self/joint attention (the only ones
dit_accel touches), where the text tokens sit in a joint sequence, how to read
the latent token grid ``(T, H, W)`` (or ``(H, W)``) from the transformer's
forward arguments, the paper defaults for each method, and the oldest Diffusers
release the integration was checked against. Nothing here copies Diffusers code;
the grid readers only look at input shapes and the transformer config.

Token counts after patchify (Diffusers 0.42), used by the readers below:

===========================  ======================  =================================
class                        latent input            grid
===========================  ======================  =================================
WanTransformer3DModel        (B, C, F, H, W)         (F/pt, H/ph, W/pw), patch (1,2,2)
HunyuanVideoTransformer3D    (B, C, F, H, W)         (F/patch_size_t, H/p, W/p)
CogVideoXTransformer3D       (B, F, C, H, W)         (F/patch_size_t or F, H/p, W/p)
MochiTransformer3DModel      (B, C, F, H, W)         (F, H/p, W/p)
LTXVideoTransformer3DModel   (B, N, C) packed        kwargs num_frames/height/width / patch
FluxTransformer2DModel       (B, N, C) packed        rows x cols of ``img_ids``
===========================  ======================  =================================
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["Preset", "PRESETS", "SUPPORTED", "GridInfo", "preset_for", "recommended", "register_preset",
           "unregister_preset"]


@dataclass(frozen=True)
class GridInfo:
    """What the forward pre-hook learns about one transformer call."""

    grid: Tuple[int, ...]  # video/image token grid after patchify
    num_text: int  # text tokens the transformer received (upper bound per attention call)

    @property
    def num_video(self) -> int:
        return math.prod(self.grid)


GridReader = Callable[[torch.nn.Module, Dict[str, object]], GridInfo]


@dataclass(frozen=True)
class Preset:
    """How dit_accel plugs into one transformer class.

    Attributes:
        class_name: the Diffusers transformer class name.
        attention: regular expressions (full match) of the module names to wrap:
            self-attention or joint attention only, never cross-attention or text-only
            attention (e.g. HunyuanVideo's token refiner).
        text_position: where text tokens sit in the joint sequence seen by SDPA:
            ``"none"`` (self-attention over video only), ``"first"`` or ``"last"``.
        read_grid: ``(transformer, bound_forward_arguments) -> GridInfo``.
        min_diffusers: oldest Diffusers version this preset is known to work with.
        defaults: per method name, ``{"method": {...config fields}, "apply": {...apply kwargs}}``
            taken from the papers (see METHODS.md).
        notes: one line for ``dit-accel info``.
    """

    class_name: str
    attention: Tuple[str, ...]
    text_position: str
    read_grid: GridReader
    min_diffusers: str
    defaults: Dict[str, Dict[str, dict]] = field(default_factory=dict)
    notes: str = ""

    def matches(self, module_name: str) -> bool:
        return any(re.fullmatch(p, module_name) for p in self.attention)


# ------------------------------------------------------------------ grid readers
def _tensor(args: dict, name: str) -> torch.Tensor:
    value = args.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"dit_accel: the transformer was called without a tensor `{name}`; cannot read the token grid")
    return value


def _text_len(args: dict) -> int:
    text = args.get("encoder_hidden_states")
    return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0


def _split(extent: int, patch: int, what: str) -> int:
    if patch < 1 or extent % patch:
        raise ValueError(f"dit_accel: latent {what} {extent} is not a multiple of the patch size {patch}")
    return extent // patch


def _wan_grid(model, args) -> GridInfo:
    x = _tensor(args, "hidden_states")  # (B, C, F, H, W)
    pt, ph, pw = model.config.patch_size
    grid = (_split(x.shape[2], pt, "frames"), _split(x.shape[3], ph, "height"), _split(x.shape[4], pw, "width"))
    return GridInfo(grid, _text_len(args))


def _hunyuan_grid(model, args) -> GridInfo:
    x = _tensor(args, "hidden_states")  # (B, C, F, H, W)
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = (_split(x.shape[2], pt, "frames"), _split(x.shape[3], p, "height"), _split(x.shape[4], p, "width"))
    return GridInfo(grid, _text_len(args))


def _cogvideox_grid(model, args) -> GridInfo:
    x = _tensor(args, "hidden_states")  # (B, F, C, H, W): frames before channels
    p, pt = model.config.patch_size, model.config.patch_size_t or 1
    grid = (x.shape[1] // pt, _split(x.shape[3], p, "height"), _split(x.shape[4], p, "width"))
    return GridInfo(grid, _text_len(args))


def _mochi_grid(model, args) -> GridInfo:
    x = _tensor(args, "hidden_states")  # (B, C, F, H, W); no temporal patch
    p = model.config.patch_size
    grid = (x.shape[2], _split(x.shape[3], p, "height"), _split(x.shape[4], p, "width"))
    return GridInfo(grid, _text_len(args))


def _ltx_grid(model, args) -> GridInfo:
    x = _tensor(args, "hidden_states")  # (B, N, C): the pipeline packs latents before the call
    dims = [args.get(k) for k in ("num_frames", "height", "width")]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError("dit_accel: LTX-Video transformer needs integer num_frames, height and width arguments "
                         "(latent sizes) to know the token grid; call it the way LTXPipeline does")
    pt, p = model.config.patch_size_t, model.config.patch_size
    grid = tuple(int(d) for d in dims)
    if grid[0] * grid[1] * grid[2] != x.shape[1]:  # sizes given before patchify
        grid = (_split(grid[0], pt, "frames"), _split(grid[1], p, "height"), _split(grid[2], p, "width"))
    if grid[0] * grid[1] * grid[2] != x.shape[1]:
        raise ValueError(f"dit_accel: LTX-Video num_frames/height/width {tuple(dims)} do not match the "
                         f"{x.shape[1]} packed tokens of hidden_states")
    return GridInfo(grid, _text_len(args))


def _flux_grid(model, args) -> GridInfo:
    x = _tensor(args, "hidden_states")  # (B, N, C) packed 2x2 latent patches
    ids = _tensor(args, "img_ids")
    ids = ids[0] if ids.dim() == 3 else ids  # (N, 3): (index, row, col)
    rows, cols = ids[:, 1], ids[:, 2]
    # One host sync per transformer call (not per attention call) to size the grid.
    h = int(rows.max() - rows.min()) + 1
    w = int(cols.max() - cols.min()) + 1
    if h * w != x.shape[1] or ids.shape[0] != x.shape[1] or bool((ids[:, 0] != ids[0, 0]).any()):
        raise ValueError(f"dit_accel: FLUX img_ids do not form a single {h}x{w} raster grid of {x.shape[1]} tokens "
                         "(reference-image conditioning such as Kontext is not supported); use the dense model")
    return GridInfo((h, w), _text_len(args))


# ---------------------------------------------------------------------- presets
_RADIAL_VIDEO = {"method": {"decay": 0.95, "block_size": 128}, "apply": {"dense_steps": 12, "dense_layers": 1}}
_SLA = {"method": {"topk": 0.05}, "apply": {}}

PRESETS: Dict[str, Preset] = {
    p.class_name: p
    for p in (
        Preset(
            "WanTransformer3DModel",
            attention=(r"blocks\.\d+\.attn1",),  # attn2 is cross-attention: stays dense
            text_position="none",
            read_grid=_wan_grid,
            min_diffusers="0.35.0",
            defaults={
                # Radial attention paper, Wan 2.1: 12 of 50 steps dense, first block dense, sink on frame 0.
                # (Wan 2.2 uses block_size=64.)
                "radial": {"method": {"decay": 0.95, "block_size": 128, "sink_frames": (0,)},
                           "apply": {"dense_steps": 12, "dense_layers": 1}},
                "tile": {"method": {"tile": (6, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                "gna": {"method": {"kernel_size": (7, 16, 16)}, "apply": {"dense_steps": 15}},
                "sla": _SLA,
            },
            notes="Wan 2.1 / 2.2 T2V and I2V; self-attention blocks.*.attn1 (video only)",
        ),
        Preset(
            "HunyuanVideoTransformer3DModel",
            # Double- and single-stream blocks; token_refiner (text only) is left alone.
            attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
            text_position="last",
            read_grid=_hunyuan_grid,
            min_diffusers="0.35.0",
            defaults={
                # STA paper: tile (6,8,8), window (3,3,3) tiles, first 15 of 50 steps dense.
                "tile": {"method": {"tile": (6, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                "radial": {"method": {"decay": 0.95, "block_size": 128, "sink_frames": ()},
                           "apply": {"dense_steps": 12, "dense_layers": 1}},
                "gna": {"method": {"kernel_size": (18, 24, 24), "stride": (6, 8, 8)}, "apply": {"dense_steps": 15}},
                "sla": _SLA,
            },
            notes="HunyuanVideo; joint attention [video, text] with padded-text key mask",
        ),
        Preset(
            "CogVideoXTransformer3DModel",
            attention=(r"transformer_blocks\.\d+\.attn1",),
            text_position="first",
            read_grid=_cogvideox_grid,
            min_diffusers="0.35.0",
            defaults={"radial": {**_RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                      "tile": {"method": {"tile": (1, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                      "sla": _SLA},
            notes="CogVideoX 1.0 / 1.5; joint attention [text, video], processor calls SDPA directly",
        ),
        Preset(
            "MochiTransformer3DModel",
            attention=(r"transformer_blocks\.\d+\.attn1",),
            text_position="last",
            read_grid=_mochi_grid,
            min_diffusers="0.35.0",
            defaults={"radial": {**_RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                      "tile": {"method": {"tile": (2, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                      "sla": _SLA},
            notes="Mochi 1; joint attention [video, valid text], one SDPA call per sample",
        ),
        Preset(
            "LTXVideoTransformer3DModel",
            attention=(r"transformer_blocks\.\d+\.attn1",),  # attn2 is cross-attention
            text_position="none",
            read_grid=_ltx_grid,
            min_diffusers="0.35.0",
            defaults={"radial": {**_RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
                      "tile": {"method": {"tile": (2, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                      "sla": _SLA},
            notes="LTX-Video; self-attention transformer_blocks.*.attn1 on packed tokens",
        ),
        Preset(
            "FluxTransformer2DModel",
            attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
            text_position="first",
            read_grid=_flux_grid,
            min_diffusers="0.35.0",
            defaults={"tile": {"method": {"tile": (8, 8), "window": (3, 3)}, "apply": {"dense_steps": 7}},
                      "gna": {"method": {"kernel_size": (32, 32)}, "apply": {"dense_steps": 7}},
                      "sla": _SLA},
            notes="FLUX.1 image model; joint attention [text, image], 2-D grid (H, W)",
        ),
    )
}

SUPPORTED: Tuple[str, ...] = tuple(PRESETS)  # the classes the package ships presets for


def register_preset(preset: Preset) -> Preset:
    """Support another transformer class: ``apply`` finds ``preset`` by ``preset.class_name`` (and subclasses).

    Example::

        register_preset(Preset("MyVideoTransformer", attention=(r"blocks\\.\\d+\\.attn1",), text_position="none",
                               read_grid=my_grid_reader, min_diffusers="0.35.0"))
    """
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a dit_accel.pipelines.Preset; got {type(preset).__name__}")
    if preset.text_position not in ("none", "first", "last"):
        raise ValueError(f"Preset.text_position={preset.text_position!r} is invalid: 'none', 'first' or 'last'")
    if not callable(preset.read_grid):
        raise TypeError("Preset.read_grid must be callable: (transformer, bound forward arguments) -> GridInfo")
    PRESETS[preset.class_name] = preset
    return preset


def unregister_preset(class_name: str) -> None:
    """Remove a registered preset (no error when absent)."""
    PRESETS.pop(class_name, None)


def _version_tuple(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        m = re.match(r"\d+", part)
        out.append(int(m.group()) if m else 0)
    return tuple(out)


def preset_for(transformer: torch.nn.Module, diffusers_version: Optional[str] = None) -> Preset:
    """The preset for ``transformer``'s class; ValueError for unsupported classes or old Diffusers."""
    name = type(transformer).__name__
    preset = PRESETS.get(name)
    if preset is None:
        for base in type(transformer).__mro__[1:]:  # subclasses of a supported class work too
            preset = PRESETS.get(base.__name__)
            if preset is not None:
                break
    if preset is None:
        raise ValueError(f"dit_accel does not support transformer class {name}; supported: {', '.join(PRESETS)}. "
                         "Support another class with dit_accel.register_preset(Preset(...))")
    if diffusers_version is None:
        import diffusers

        diffusers_version = diffusers.__version__
    if _version_tuple(diffusers_version) < _version_tuple(preset.min_diffusers):
        raise ValueError(f"dit_accel needs diffusers>={preset.min_diffusers} for {preset.class_name} "
                         f"(installed: {diffusers_version}); run `pip install -U 'diffusers>={preset.min_diffusers}'`")
    return preset


def recommended(transformer_or_class, method: str):
    """Paper defaults for ``method`` on a model: ``(Method, apply_kwargs)``.

    Example::

        m, kw = recommended(pipe.transformer, "radial")
        dit_accel.apply(pipe, m, **kw)
    """
    from ..methods import method_from_name

    name = transformer_or_class if isinstance(transformer_or_class, str) else (
        transformer_or_class.__name__ if isinstance(transformer_or_class, type) else type(transformer_or_class).__name__)
    if name not in PRESETS:
        raise ValueError(f"no preset for {name}; supported: {', '.join(PRESETS)}")
    entry = PRESETS[name].defaults.get(method, {"method": {}, "apply": {}})
    return method_from_name(method, **entry["method"]), dict(entry["apply"])
