"""Per-model knowledge as data: one :class:`Preset` per supported transformer class.

A preset says which attention modules hold self/joint attention (the only ones
dit_accel touches), where the text tokens sit in a joint sequence, how to read
the latent token grid ``(T, H, W)`` (or ``(H, W)``) from the transformer's
forward arguments, the settings the methods' authors published for the model
(:class:`Published`: values, the shape they were published for, and their
source), dit_accel's defaults for the other methods, and the oldest Diffusers
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
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

__all__ = ["Preset", "PRESETS", "SUPPORTED", "GridInfo", "Published", "preset_for", "recommended", "register_preset",
           "unregister_preset", "family_of", "published_settings", "resolve_model_family"]


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
        defaults: per method name, ``{"method": {...config fields}, "apply": {...apply kwargs}}``:
            dit_accel's defaults where no published setting exists.
        notes: one line for ``dit-accel info``.
        published: the settings the methods' authors published for this class
            (:class:`Published`); the first of a (family, method) is what
            :func:`recommended` returns for it.
        grid_key: ``(bound_forward_arguments) -> hashable or None``: a cheap fingerprint of what
            ``read_grid`` reads from the call, such that equal fingerprints (for one transformer) give
            equal :class:`GridInfo`; the pre-hook then reuses the last call's instead of reading again.
            None (the default, or returned): read every call.
    """

    class_name: str
    attention: Tuple[str, ...]
    text_position: str
    read_grid: GridReader
    min_diffusers: str
    defaults: Dict[str, Dict[str, dict]] = field(default_factory=dict)
    notes: str = ""
    published: Tuple["Published", ...] = ()
    grid_key: Optional[Callable[[Dict[str, object]], Optional[Hashable]]] = None

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


def _shapes_key(args: dict) -> Optional[tuple]:
    """What the shape-only readers (Wan, HunyuanVideo, CogVideoX, Mochi) read: two tensor shapes."""
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    if not isinstance(x, torch.Tensor):
        return None
    return x.shape, (text.shape if isinstance(text, torch.Tensor) else None)


def _ltx_key(args: dict) -> Optional[tuple]:
    """What :func:`_ltx_grid` reads: two tensor shapes and the latent sizes."""
    key = _shapes_key(args)
    dims = tuple(args.get(k) for k in ("num_frames", "height", "width"))
    return None if key is None or not all(type(d) is int for d in dims) else key + dims


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


# ---------------------------------------------------------------------- published
@dataclass(frozen=True)
class Published:
    """A setting a method's authors published for a model: the values, the shape, the source.

    Attributes:
        family: the model family it was published for (``"Wan 2.1"``, ``"Wan 2.2"``, ``"HunyuanVideo"``).
        method: the registered method name. config: its config fields. apply: ``apply`` kwargs.
        shape: the video it was published for (resolution, frames, steps, checkpoint).
        grid: the latent token grid of that shape (where ``dit-accel info`` reports the density).
        source: the paper or repository (with commit and file) the values come from.
    """

    family: str
    method: str
    config: Dict[str, Any]
    apply: Dict[str, Any]
    shape: str
    grid: Tuple[int, ...]
    source: str

    def build(self):
        """``(Method, apply kwargs)`` of this setting."""
        from ..methods import method_from_name

        return method_from_name(self.method, **self.config), dict(self.apply)


_RADIAL_REPO = "mit-han-lab/radial-attention@72788d4"
_WAN_PUBLISHED = (
    Published("Wan 2.1", "radial", {"decay": 0.2, "block_size": 128, "sink_frames": (0,), "rule": "reference"},
              {"dense_steps": 12, "dense_layers": 1}, "768x1280, 69 frames, 50 steps (Wan2.1-T2V-14B)", (18, 48, 80),
              f"{_RADIAL_REPO} scripts/wan_t2v_inference.sh; block 128 and frame-0 sink: "
              "radial_attn/models/wan/attention.py, radial_attn/attn_mask.py"),
    Published("Wan 2.2", "radial", {"decay": 0.8, "block_size": 64, "sink_frames": (0,), "rule": "reference"},
              {"dense_steps": 11, "dense_layers": 1}, "768x1280, 77 frames, 40 steps (Wan2.2-T2V-A14B)", (20, 48, 80),
              f"{_RADIAL_REPO} scripts/wan_22_t2v_inference.sh; block 64: radial_attn/models/wan2_2/attention.py"),
    Published("Wan 2.1", "sla", {"topk": 0.05}, {}, "480p, 81 frames (Wan2.1-T2V-1.3B, after fine-tuning)",
              (21, 30, 52), "SLA paper (Zhang et al., arXiv:2509.24006): 95% sparsity on Wan2.1-T2V-1.3B"),
    Published("Wan 2.1", "sla", {"topk": 0.1, "block_q": 128, "block_k": 64, "linear_tokens": "all",
                                 "rounding": "floor", "linear_eps": 1e-5},
              {}, "480p, 81 frames, 4 steps (TurboWan2.1-T2V-1.3B-480P checkpoints; `dit-accel convert`)",
              (21, 30, 52), "thu-ml/TurboDiffusion@fcf81c9 README (--sla_topk 0.1 default, 0.15 recommended), "
              "turbodiffusion/inference/modify_model.py (sla: BLKQ=128, BLKK=64), turbodiffusion/SLA/core.py"),
)
_HUNYUAN_PUBLISHED = (
    Published("HunyuanVideo", "radial", {"decay": 0.95, "block_size": 128, "sink_frames": (), "rule": "reference"},
              {"dense_steps": 12}, "768x1280, 117 frames, 50 steps", (30, 48, 80),
              f"{_RADIAL_REPO} scripts/hunyuan_t2v_inference.sh (dense_layers 0); no sink: radial_attn/attn_mask.py"),
    Published("HunyuanVideo", "tile", {"tile": (6, 8, 8), "window": (3, 3, 3)}, {"dense_steps": 15},
              "768x1280, 117 frames, 50 steps", (30, 48, 80),
              "STA paper (Zhang et al., arXiv:2502.04507) as calibrated in docs/METHODS.md; the searched per-head "
              "windows: FastVideo assets/mask_strategy_hunyuan.json through Tile.from_strategy"),
)

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
            grid_key=_shapes_key,
            min_diffusers="0.35.0",
            defaults={  # radial: see published (SLA too, for Wan 2.1)
                "tile": {"method": {"tile": (6, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                "gna": {"method": {"kernel_size": (7, 16, 16)}, "apply": {"dense_steps": 15}},
                "sla": _SLA,
            },
            notes="Wan 2.1 / 2.2 T2V and I2V; self-attention blocks.*.attn1 (video only)",
            published=_WAN_PUBLISHED,
        ),
        Preset(
            "HunyuanVideoTransformer3DModel",
            # Double- and single-stream blocks; token_refiner (text only) is left alone.
            attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
            text_position="last",
            read_grid=_hunyuan_grid,
            grid_key=_shapes_key,
            min_diffusers="0.35.0",
            defaults={  # radial and tile: see published
                "gna": {"method": {"kernel_size": (18, 24, 24), "stride": (6, 8, 8)}, "apply": {"dense_steps": 15}},
                "sla": _SLA,
            },
            notes="HunyuanVideo; joint attention [video, text] with padded-text key mask",
            published=_HUNYUAN_PUBLISHED,
        ),
        Preset(
            "CogVideoXTransformer3DModel",
            attention=(r"transformer_blocks\.\d+\.attn1",),
            text_position="first",
            read_grid=_cogvideox_grid,
            grid_key=_shapes_key,
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
            grid_key=_shapes_key,
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
            grid_key=_ltx_key,
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


# Pipelines whose transformer class is supported but whose calls are not: refused at apply() with the reason.
UNSUPPORTED_PIPELINES: Dict[str, str] = {
    "LTXConditionPipeline": (
        "it calls the transformer with video_coords (per-token positions of its conditioning frames and the "
        "video) and no num_frames/height/width, and its token count changes with the conditions, so the "
        "token grid the sparse patterns need is unknown. Use LTXPipeline or LTXImageToVideoPipeline"),
}


def check_pipeline(pipe) -> None:
    """ValueError when ``pipe`` is a pipeline class listed in :data:`UNSUPPORTED_PIPELINES` (or a subclass)."""
    for cls in type(pipe).__mro__:
        reason = UNSUPPORTED_PIPELINES.get(cls.__name__)
        if reason is not None:
            raise ValueError(f"dit_accel does not support {type(pipe).__name__}: {reason}.")


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


def _class_name(transformer_or_class) -> str:
    if isinstance(transformer_or_class, str):
        return transformer_or_class
    cls = transformer_or_class if isinstance(transformer_or_class, type) else type(transformer_or_class)
    return cls.__name__


def family_of(pipe_or_transformer) -> Optional[str]:
    """The model family of a pipeline or transformer for :class:`Published` lookups, or None when unknown.

    Wan pipelines with a second expert (``transformer_2``, Wan 2.2 A14B) and Wan transformers with
    48 latent channels (Wan 2.2 TI2V-5B) are ``"Wan 2.2"``, other Wan models ``"Wan 2.1"`` (a bare
    A14B expert looks like Wan 2.1: pass ``family=`` to :func:`recommended` for it).
    """
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    name = _class_name(transformer)
    if name == "WanTransformer3DModel":
        config = getattr(transformer, "config", None)
        second = getattr(pipe_or_transformer, "transformer_2", None) is not None
        return "Wan 2.2" if second or getattr(config, "in_channels", None) == 48 else "Wan 2.1"
    preset = PRESETS.get(name)
    return preset.published[0].family if preset is not None and preset.published else None


def published_settings(transformer_or_class, method: Optional[str] = None,
                       family: Optional[str] = None) -> Tuple[Published, ...]:
    """The published settings for a model class (a name, a class or an instance), optionally of one method
    and one family (default: the family of an instance, else every family)."""
    preset = PRESETS.get(_class_name(transformer_or_class))
    if preset is None:
        return ()
    if family is None and not isinstance(transformer_or_class, (str, type)):
        family = family_of(transformer_or_class)
    return tuple(p for p in preset.published
                 if (method is None or p.method == method) and (family is None or p.family == family))


def recommended(transformer_or_class, method: str, family: Optional[str] = None):
    """The settings for ``method`` on a model: ``(Method, apply_kwargs)``.

    The first published setting of the model's family (:class:`Published`, e.g. the radial
    reference scripts' decay and dense steps) when there is one, else dit_accel's preset
    default, else the method's config defaults.

    Example::

        m, kw = recommended(pipe.transformer, "radial")   # Wan 2.1: Radial(decay=0.2, rule="reference"), ...
        dit_accel.apply(pipe, m, **kw)
    """
    from ..methods import method_from_name

    name = _class_name(transformer_or_class)
    if name not in PRESETS:
        raise ValueError(f"no preset for {name}; supported: {', '.join(PRESETS)}")
    published = published_settings(transformer_or_class, method, family)
    if published:
        return published[0].build()
    entry = PRESETS[name].defaults.get(method, {"method": {}, "apply": {}})
    return method_from_name(method, **entry["method"]), dict(entry["apply"])


# Words in a hub id or folder name that name a model family (first match wins: "wan2.2" before "wan").
_FAMILY_WORDS = (
    (r"wan-?2[._]?2", "WanTransformer3DModel", "Wan 2.2"), (r"wan", "WanTransformer3DModel", "Wan 2.1"),
    (r"hunyuan", "HunyuanVideoTransformer3DModel", "HunyuanVideo"),
    (r"cogvideo", "CogVideoXTransformer3DModel", None), (r"mochi", "MochiTransformer3DModel", None),
    (r"ltx", "LTXVideoTransformer3DModel", None), (r"flux", "FluxTransformer2DModel", None),
)


def _folder_family(folder: Path) -> Optional[Tuple[str, Optional[str]]]:
    """``(class name, family)`` from a Diffusers folder's ``model_index.json``, or None."""
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    from .._io import read_json

    info = read_json(index, expected="a Diffusers model_index.json (a JSON object naming the components)")
    entry = info.get("transformer") or [None, None]
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name not in PRESETS:
        return None
    if name == "WanTransformer3DModel":
        second = isinstance(info.get("transformer_2"), list) and info["transformer_2"][1] is not None
        return name, "Wan 2.2" if second or info.get("expand_timesteps") else "Wan 2.1"
    return name, family_of(name)


def resolve_model_family(model: str) -> Tuple[str, Optional[str]]:
    """``(transformer class name, family)`` for a ``--model`` value, without loading the model.

    Accepts a transformer class name (``WanTransformer3DModel``), a family (``"Wan 2.2"``), an
    embedded tiny model, a local Diffusers folder (its ``model_index.json``) or a hub id / folder
    name that names the family (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``).
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model={model!r} is invalid: pass a hub id, a folder, a tiny model or a class name")
    if model in PRESETS:
        return model, family_of(model)
    families = {p.family: p for preset in PRESETS.values() for p in preset.published}
    for family in families:
        if model.strip().lower() == family.lower():
            return next(c for c, preset in PRESETS.items() if families[family] in preset.published), family
    if model.startswith("tiny-"):
        model = {"tiny-wan": "Wan", "tiny-shapes": "Wan", "tiny-flux": "FLUX"}.get(model, model)
    folder = Path(model).expanduser()
    found = _folder_family(folder) if folder.is_dir() else None
    if found is not None:
        return found
    for pattern, class_name, family in _FAMILY_WORDS:
        if re.search(pattern, model.lower()):
            return class_name, family
    raise ValueError(f"cannot tell which model {model!r} is: pass a transformer class ({', '.join(PRESETS)}), a "
                     f"family ({', '.join(families)}), a Diffusers folder or a hub id naming the model")
