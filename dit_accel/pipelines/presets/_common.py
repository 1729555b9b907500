"""What every preset module uses: :class:`Preset`, :class:`GridInfo`, :class:`Published`, and the
grid-reader helpers shared by several families. It imports nothing of the package's registry, so the
family modules and ``__init__`` both build on it without a cycle."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

from ..._util import is_int

__all__ = ["GridInfo", "GridReader", "Preset", "Published", "tensor_arg", "text_len", "split_patch", "shapes_key",
           "raster_ids", "leading_raster", "RADIAL_REPO", "RADIAL_VIDEO", "SLA_DEFAULT", "IMAGE_DEFAULTS", "WAN_DEFAULTS",
           "LARGE_VIDEO_DEFAULTS", "latent_grid_2d", "latent_grid_3d", "patched_video_grid",
           "channels_last_grid", "video_latent"]


@dataclass(frozen=True)
class GridInfo:
    """What the forward pre-hook learns about one transformer call."""

    grid: Tuple[int, ...]  # video/image token grid after patchify
    num_text: int  # text tokens the transformer received (upper bound per attention call; exact for Qwen-Image 2.1,
    # whose image queries come alone against [prefix, image] keys and are told apart by this count)
    num_after: int = 0  # of num_text, the tokens that follow the grid in the joint sequence (text first only):
    # [text, grid, after] (FLUX.2 / Qwen-Image-Edit reference images); their rows and columns run exact

    def __post_init__(self) -> None:
        # A registered preset's reader is user code: a float size, or a negative num_after, failed deep in the plan as
        # a bare TypeError ("slice indices must be integers") or RuntimeError ("upper bound and lower bound
        # inconsistent with step sign"), and num_after past num_text ran. Shape sizes of a traced call (SymInt) pass.
        if not isinstance(self.grid, (tuple, list)) or not self.grid or not all(map(_whole, self.grid)):
            raise ValueError(f"dit_accel: GridInfo(grid={self.grid!r}) is invalid: the token grid is a tuple of ints "
                             "(T, H, W) or (H, W) after the patch; a preset's read_grid builds it from the call's shapes")
        for name, count in (("num_text", self.num_text), ("num_after", self.num_after)):
            if not _whole(count) or (type(count) is int and count < 0):
                raise ValueError(f"dit_accel: GridInfo({name}={count!r}) is invalid: a count of tokens, an int >= 0")
        if type(self.num_text) is int and type(self.num_after) is int and self.num_after > self.num_text:
            raise ValueError(f"dit_accel: GridInfo(num_after={self.num_after}) is more than num_text={self.num_text}: "
                             "the tokens after the grid are counted in num_text too (num_text: every token beside the "
                             "grid; num_after: those of them that follow it)")

    @property
    def num_video(self) -> int:
        return math.prod(self.grid)


def _whole(n) -> bool:
    """An int-valued size: a Python or NumPy int, a traced SymInt or a 0-d integer tensor (not a bool or a float)."""
    if isinstance(n, torch.Tensor):
        return n.dim() == 0 and not n.is_floating_point() and not n.is_complex() and n.dtype != torch.bool
    return is_int(n) or isinstance(n, torch.SymInt)


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
        hub_words: ``(regex, family or None)`` pairs searched (in order, lower case) in a hub id or folder
            name to tell that it holds this class (``resolve_model_family``). Put a specific word before a
            general one (``wan-?2[._]?2`` before ``wan``); families are searched in registry order.
        read_family: ``(pipeline or transformer or class name) -> family or None`` where one class serves
            several published families (Wan 2.1 / 2.2). None: the first published family.
        read_index_family: ``(model_index.json as a dict) -> family or None``, the same from a Diffusers
            folder without loading it. None: :attr:`read_family` of the class name.
        refused_pipelines: ``{pipeline class name: reason}``: pipelines around this transformer whose
            calls the grid reader cannot read; ``apply`` refuses them (and subclasses) with the reason,
            which should say what to use instead.
        refused: non-empty for a class dit_accel knows but cannot make sparse (its calls carry no single
            token grid: FramePack's packed history, ...): why, and what would work instead. ``apply``
            (``preset_for``) raises it; the class is not in ``SUPPORTED``. Build one with :meth:`refusing`.
        square_mask: the wrapped processors give SDPA a bool ``(B, 1, S, S)`` mask that is query-valid AND
            key-valid of one padding mask under which every video token is valid (HunyuanVideo 1.5): the row of
            a video query is then used as the key-padding mask. Padded text queries attend the valid keys
            instead of nothing; being masked keys everywhere, their outputs never reach a valid token.
        additive_mask: for a model whose processors give SDPA a *float* ``(B, 1, S, S)`` mask ``m_i * m_j``
            (0 / 1, added to the scores: Chroma) built from the transformer's ``attention_mask`` ``m`` ``(B, S)``:
            ``(call arguments, GridInfo) -> bool``, whether ``m`` is 1 on every video token (read once per
            transformer call). Then a video query's row adds 1 to every video key and ``m_j`` to text key
            ``j``: softmax is shift-invariant, so the sparse video part runs without a bias and the text
            keys get ``m_j - 1`` in the dense text branch; text queries run dense with their own rows. Calls
            whose ``m`` is not 1 on the video run dense. None: float square masks run dense.
        refused_methods: ``{method name: reason}``: methods that have no meaning on this class's calls
            (Radial, a temporal rule, on a model whose sparse calls see a 2-D grid); ``apply`` and
            :func:`recommended` refuse them naming the class and the reason.
        split_whole: how Diffusers' context parallelism (``_cp_plan``) splits a joint sequence: False (each
            rank holds a share of the text and a share of the video, ``[t_r, v_r]``); True (the model splits
            its one sequence contiguously, MiniMax-H3's packed rows, LTX-2's appended tokens: the Ulysses
            gather gives the model's own order back; Ring is refused for such calls).
        ring_unwrapped: the layers dit_accel leaves to Diffusers that Diffusers still runs under its own context
            parallelism (LTX-Video's cross-attention ``attn2``), named for the error ('': none). Diffusers' Ring
            merges key shards by log-sum-exp, which the native backend does not return, so ``apply`` and
            ``enable_parallelism`` refuse Ring while those layers use a backend without one.
        grid_dims: the rank of the token grid the sparse calls see: 3, a video's (T, H, W); 2, an image's (H, W)
            or one frame's (Latte's spatial blocks). ``apply`` and :func:`recommended` refuse a method or setting
            for another rank (VSA, Radial or a ``tile=(6, 8, 8)`` on an image model), naming the class. None (a
            preset that does not say): the first call's grid refuses them instead.
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
    hub_words: Tuple[Tuple[str, Optional[str]], ...] = ()
    read_family: Optional[Callable[[Any], Optional[str]]] = None
    read_index_family: Optional[Callable[[dict], Optional[str]]] = None
    refused_pipelines: Dict[str, str] = field(default_factory=dict)
    refused: str = ""
    square_mask: bool = False
    additive_mask: Optional[Callable[[Dict[str, object], "GridInfo"], bool]] = None
    split_whole: bool = False
    ring_unwrapped: str = ""
    refused_methods: Dict[str, str] = field(default_factory=dict)
    grid_dims: Optional[int] = None

    @classmethod
    def refusing(cls, class_name: str, reason: str, min_diffusers: str = "0.0.0", **fields) -> "Preset":
        """A preset that refuses ``class_name`` with ``reason`` (why, and what would work instead).

        Example::

            Preset.refusing("HunyuanVideoFramepackTransformer3DModel",
                            "its calls pack a history of clean latents at three scales ahead of the new "
                            "frames, so there is no single token grid; use the dense model")
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("Preset.refusing needs a reason: why the class cannot be made sparse, what would work")
        return cls(class_name, attention=(), text_position="none", read_grid=_refused_grid,
                   min_diffusers=min_diffusers, refused=reason, **fields)

    def matches(self, module_name: str) -> bool:
        return any(re.fullmatch(p, module_name) for p in self.attention)


def _refused_grid(model, args) -> GridInfo:
    # Never reached through apply: preset_for raises the preset's own reason before any grid is read.
    raise ValueError(f"dit_accel does not support transformer class {type(model).__name__} (its preset refuses it)")


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
        from ...methods import method_from_name

        return method_from_name(self.method, **self.config), dict(self.apply)


RADIAL_REPO = "mit-han-lab/radial-attention@72788d4"  # the commit the radial settings quote

# dit_accel defaults shared by several video families (no published setting behind them).
RADIAL_VIDEO = {"method": {"decay": 0.95, "block_size": 128}, "apply": {"dense_steps": 12, "dense_layers": 1}}
SLA_DEFAULT = {"method": {"topk": 0.05}, "apply": {}}
# dit_accel's defaults for Wan's token layout (Wan 2.1's; radial is published for Wan itself, so the models
# of its lineage add RADIAL_VIDEO): Tile windows of 3x3x3 tiles of 6x8x8 tokens, a 7x16x16 GNA neighbourhood,
# the first 15 steps dense; SLA top-k 5%.
WAN_DEFAULTS = {"tile": {"method": {"tile": (6, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 15}},
                "gna": {"method": {"kernel_size": (7, 16, 16)}, "apply": {"dense_steps": 15}},
                "sla": SLA_DEFAULT}
# dit_accel's defaults for video models of larger latent frames without a published setting (Cosmos, Allegro).
LARGE_VIDEO_DEFAULTS = {
    "gna": {"method": {"kernel_size": (8, 24, 24)}, "apply": {"dense_steps": 10}},
    "tile": {"method": {"tile": (4, 8, 8), "window": (3, 3, 3)}, "apply": {"dense_steps": 10}},
    "radial": {**RADIAL_VIDEO, "method": {"decay": 0.95, "block_size": 128, "sink_frames": ()}},
    "sla": SLA_DEFAULT,
}
# dit_accel's defaults for image models without a published setting (FLUX.1's): Tile windows of 3x3
# tiles of 8x8 tokens, a 32x32 GNA neighbourhood, the first 7 steps dense; SLA top-k 5%.
IMAGE_DEFAULTS = {"tile": {"method": {"tile": (8, 8), "window": (3, 3)}, "apply": {"dense_steps": 7}},
                  "gna": {"method": {"kernel_size": (32, 32)}, "apply": {"dense_steps": 7}},
                  "sla": SLA_DEFAULT}


def patched_video_grid(model, args) -> Tuple[int, int, int]:
    """Token grid of a video model called with latents ``(B, C, F, H, W)``: its config's patch is a
    ``(pt, ph, pw)`` tuple (Wan) or a spatial ``patch_size`` with a temporal ``patch_size_t`` (HunyuanVideo)."""
    x = video_latent(args)
    patch = model.config.patch_size
    pt, ph, pw = tuple(patch) if isinstance(patch, (tuple, list)) else (model.config.patch_size_t, patch, patch)
    return (split_patch(x.shape[2], pt, "frames"), split_patch(x.shape[3], ph, "height"),
            split_patch(x.shape[4], pw, "width"))


def channels_last_grid(model, args) -> Tuple[int, int, int]:
    """Token grid of a channels-last video latent ``(B, F, H, W, C)`` and a ``(pt, ph, pw)`` config patch
    (Kandinsky 5 / 6)."""
    x = video_latent(args, "(B, F, H, W, C)")
    pt, ph, pw = tuple(model.config.patch_size)
    return (split_patch(x.shape[1], pt, "frames"), split_patch(x.shape[2], ph, "height"),
            split_patch(x.shape[3], pw, "width"))


def latent_grid_3d(model, args) -> "GridInfo":
    """:func:`patched_video_grid` with the text length of a cross- or joint-attention call."""
    return GridInfo(patched_video_grid(model, args), text_len(args))


def latent_grid_2d(model, args) -> "GridInfo":
    """Grid of an image model called with unpacked latents ``(B, C, H, W)`` and an int ``patch_size``."""
    x = tensor_arg(args, "hidden_states")
    p = model.config.patch_size
    return GridInfo((split_patch(x.shape[-2], p, "height"), split_patch(x.shape[-1], p, "width")), text_len(args))


def image_only_grid_2d(model, args) -> "GridInfo":
    """:func:`latent_grid_2d` of a model whose self-attention sees the image tokens only (the text reaches them
    by cross-attention): no text in the sparse call."""
    return GridInfo(latent_grid_2d(model, args).grid, 0)


# ------------------------------------------------------------------ grid readers
def tensor_arg(args: dict, name: str) -> torch.Tensor:
    """The tensor argument ``name`` of a transformer call; ValueError when the call has none."""
    value = args.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"dit_accel: the transformer was called without a tensor `{name}`; cannot read the token grid")
    return value


def video_latent(args: dict, layout: str = "(B, C, F, H, W)") -> torch.Tensor:
    """The ``hidden_states`` of a video model's call, a 5-D ``layout`` latent; ValueError for another rank (an image
    latent, a packed sequence), which a reader indexing its axes would meet as a bare IndexError."""
    x = tensor_arg(args, "hidden_states")
    if x.dim() != 5:
        raise ValueError(f"dit_accel: hidden_states of shape {tuple(x.shape)} is not a {layout} video latent; call "
                         "the transformer with the 5-D latent its pipeline builds")
    return x


def text_len(args: dict) -> int:
    """Text tokens of a call: ``encoder_hidden_states.shape[1]``, 0 without (B, N, C) text."""
    text = args.get("encoder_hidden_states")
    return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0


def split_patch(extent: int, patch: int, what: str) -> int:
    """``extent / patch`` tokens along one axis; ValueError when the latent is not a multiple of the patch."""
    if patch < 1 or extent % patch:
        raise ValueError(f"dit_accel: latent {what} {extent} is not a multiple of the patch size {patch}, so it is not "
                         f"a whole number of tokens (the model cannot patchify it either): make the latent {what} "
                         f"a multiple of {patch}")
    return extent // patch


def raster_ids(ids: torch.Tensor, n: int, what: str, row: int = 1, col: int = 2) -> Tuple[int, int]:
    """``(H, W)`` of position ids ``(N, axes)`` (or ``(B, N, axes)``) laid out as one row-major raster grid of
    ``n`` tokens (columns ``row``/``col``; every other axis constant); ValueError naming ``what`` otherwise
    (reference images at other offsets, packed sequences). One host sync per transformer call."""
    ids = ids[0] if ids.dim() == 3 else ids
    if ids.dim() != 2 or ids.shape[0] != n or n == 0:
        raise ValueError(f"dit_accel: {what} position ids of shape {tuple(ids.shape)} do not describe the {n} "
                         "image tokens of the call; use the dense model")
    rows, cols = ids[:, row].long(), ids[:, col].long()
    r0, c0 = int(rows[0]), int(cols[0])
    w = int(cols.max()) - c0 + 1
    h = n // w if w > 0 else 0
    k = torch.arange(n, device=ids.device)
    others = [a for a in range(ids.shape[1]) if a not in (row, col)]
    if h * w != n or not bool(((rows - r0) == k // w).all() & ((cols - c0) == k % w).all()) or any(
            bool((ids[:, a] != ids[0, a]).any()) for a in others):
        raise ValueError(f"dit_accel: the {what} tokens of this call are not one {h}x{w} raster grid (reference or "
                         "conditioning images in the same sequence, or a packed layout); dit_accel cannot place "
                         "them: use the dense model (or call without reference images)")
    return h, w


def leading_raster(args: dict, what: str) -> GridInfo:
    """The :class:`GridInfo` of a call of packed ``(B, N, C)`` ``hidden_states`` whose ``img_ids`` ``(N, axes)`` (or
    ``(B, N, axes)``) lay the tokens out as [image, after], text first: the leading run of one value in column 0
    (FLUX.2's t, LongCat-Image's modality, FIBO's reference plane) is the generated image, one raster grid
    (:func:`raster_ids`, ValueError naming ``what`` otherwise); the ``after`` tokens behind it, at other values, are
    the reference images of edit calls, exact like the text (``num_after``)."""
    n = tensor_arg(args, "hidden_states").shape[1]
    ids = tensor_arg(args, "img_ids")
    ids = ids[0] if ids.dim() == 3 else ids
    target = n
    if ids.dim() == 2 and ids.shape[0] == n and n:
        other = (ids[:, 0] != ids[0, 0]).nonzero()  # the first token of another plane: one host sync per call
        target = int(other[0, 0]) if other.numel() else n
    h, w = raster_ids(ids[:target] if target < n else ids, target, what)  # (ids of another shape: says so)
    return GridInfo((h, w), text_len(args) + n - target, num_after=n - target)


def shapes_key(args: dict) -> Optional[tuple]:
    """``Preset.grid_key`` of the shape-only readers (Wan, HunyuanVideo, CogVideoX, Mochi): two tensor shapes."""
    x, text = args.get("hidden_states"), args.get("encoder_hidden_states")
    if not isinstance(x, torch.Tensor):
        return None
    return x.shape, (text.shape if isinstance(text, torch.Tensor) else None)
