"""A training term that teaches a model's own dense attention to stay inside a sparse pattern.

A sparse plan keeps quality when the dense model already puts (almost) all of each query's attention
inside the plan's pattern: what the pattern leaves out then weighs nothing. :class:`AttentionLocality`
measures exactly that during training. While it is active, every self-attention call of the
transformer (``attn1`` of each block, the calls a plan makes sparse) is watched; for a random sample
of its queries the dense attention probabilities are recomputed against all keys and the mass that
falls outside the pattern's token mask is recorded. :meth:`AttentionLocality.outside` returns that
mass per sample, averaged over layers, heads and sampled queries, with gradients: added to the loss,
it moves the logits (through ``to_q``, ``to_k``, their norms and RoPE) so that the saved stock model
attends inside the pattern, and the sparse plan then changes little.

This differs from ``train_tiny --local``, which pulls a sparse *prediction* toward the dense one: that
term can be met by a model that draws nothing (BENCHMARKS.md section 8.7 records five such runs), while this one
constrains only where attention goes, never what the model predicts.

Example::

    with AttentionLocality(pipe.transformer, Tile(tile=(1, 8, 8), window=(3, 1, 1))) as locality:
        pred = pipe.transformer(**inputs)[0]
        loss = F.mse_loss(pred, target) + 0.5 * locality.outside().mean()
"""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["AttentionLocality", "pattern_mask", "check_pattern_method"]


def check_pattern_method(method) -> None:
    """ValueError unless ``method``'s pattern is fixed by the grid (Tile, GNA or Dense): the term needs one mask."""
    from ..methods import GNA, Dense, Tile

    if not isinstance(method, (Tile, GNA, Dense)):
        raise ValueError(f"the locality term needs a pattern fixed by the grid (tile, gna or dense); "
                         f"got {getattr(method, 'name', type(method).__name__)!r}, whose blocks depend on the data")


def pattern_mask(method, grid: Tuple[int, ...]) -> torch.Tensor:
    """Token mask of ``method`` on ``grid`` in raster order: bool ``[N, N]`` (or ``[H, N, N]`` per head).

    Tile and GNA, the methods whose pattern is fixed by the grid (dense: everything). Others raise
    ValueError: their pattern depends on the data, so there is no one mask to stay inside.
    """
    import warnings

    from .._util import DitAccelWarning
    from ..methods import GNA, Tile
    from ..patterns.checks import per_head
    from ..patterns.gna import gna_mask
    from ..patterns.separable import kron
    from ..patterns.tile import fit_tile, tile_mask

    check_pattern_method(method)
    grid = tuple(int(g) for g in grid)
    # fit=True: the pattern its plan runs on this grid (Tile.fitted's tile and window, GNA's kernels clamped
    # to the grid), not the one given: the term measured another pattern's mass, or refused a GNA kernel it runs.
    if isinstance(method, Tile):
        tile, window = method.tile, method.window
        if method.fit and method.block_size is None and per_head(window) is None:
            tile, window = fit_tile(grid, tile, window)
        return tile_mask(grid, tile, window)
    if isinstance(method, GNA):
        if method.fit and per_head(method.kernel_size) is None:
            with warnings.catch_warnings():  # (the plan notes the clamp)
                warnings.simplefilter("ignore", DitAccelWarning)
                fitted = method._fitted_relations(grid)
            if fitted is not None:
                return kron(fitted[1])
        return gna_mask(grid, method.kernel_size, method.stride, method.dilation, method.is_causal)
    n = _tokens(grid)
    return torch.ones(n, n, dtype=torch.bool)  # Dense


class AttentionLocality:
    """Watch a Diffusers video transformer's self-attention; report the dense attention mass outside a pattern.

    Args:
        transformer: a transformer whose blocks hold ``attn1`` self-attention modules and whose input
            ``hidden_states`` is ``[B, C, T, H, W]`` (Wan-like: ``config.patch_size`` gives the token grid).
        method: the pattern (:func:`pattern_mask`): a Tile or GNA config, one window per head allowed; or a
            tuple of them, measured on the same sampled attention (:meth:`outside` then gives one row each).
        queries: queries sampled per call (the same for every sample and head); all when the video has fewer.
        generator: CPU generator of the query samples (training stays reproducible).

    Use as a context manager around the forward passes; :meth:`outside` then gives the mass per sample and
    clears what was recorded. Outside the ``with`` block the transformer is untouched. Inside it,
    ``torch.nn.functional.scaled_dot_product_attention`` is this watcher's for the whole process (Diffusers looks it
    up there on every call): one watcher at a time, in a training loop on one thread. The token masks (bool, per
    pattern and grid) are kept on the watcher.
    """

    def __init__(self, transformer, method, *, queries: int = 256, generator: torch.Generator = None):
        if queries < 1:
            raise ValueError(f"queries must be at least 1, got {queries}")
        self.transformer = transformer
        self.methods = tuple(method) if isinstance(method, (tuple, list)) else (method,)
        self._one = not isinstance(method, (tuple, list))
        if not self.methods:
            raise ValueError("give at least one pattern method")
        for m in self.methods:
            check_pattern_method(m)
        self.queries = int(queries)
        self.generator = generator
        self._modules = [m for name, m in transformer.named_modules() if name.endswith("attn1")]
        if not self._modules:
            raise ValueError(f"{type(transformer).__name__} has no 'attn1' self-attention modules to watch")
        heads = sorted({h for h in (getattr(m, "heads", None) for m in self._modules) if isinstance(h, int)})
        for m in self.methods:  # (before: a raw "size of tensor a (4) must match ... (2)" at the first forward)
            own = getattr(m, "heads", None)  # a Tile's or GNA's per-head windows
            if isinstance(own, int) and heads and heads != [own]:
                raise ValueError(f"method {m!r} has windows for {own} heads, but the attn1 layers of "
                                 f"{type(transformer).__name__} have {', '.join(map(str, heads))}: give one window "
                                 "per head, or one window for every head")
        self._handles: List = []
        self._terms: List[torch.Tensor] = []
        self._grid = None
        self._watching = False
        self._sdpa = None
        self._masks = {}  # (pattern index, grid) -> bool token mask

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> "AttentionLocality":
        self._handles.append(self.transformer.register_forward_pre_hook(self._read_grid, with_kwargs=True))
        for module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop))
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._watched_sdpa
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._sdpa
        for handle in self._handles:
            handle.remove()
        self._handles, self._terms, self._watching = [], [], False

    def _read_grid(self, _module, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        pt, ph, pw = self.transformer.config.patch_size
        _, _, t, h, w = latents.shape
        self._grid = (t // pt, h // ph, w // pw)

    def _start(self, *_):
        self._watching = True

    def _stop(self, *_):
        self._watching = False

    # ------------------------------------------------------------------ the measurement
    def _watched_sdpa(self, query, key, value, *args, **kwargs):
        out = self._sdpa(query, key, value, *args, **kwargs)
        # Self-attention over exactly the video tokens: cross-attention (other key length) is not watched.
        if self._watching and query.dim() == 4 and query.shape[-2] == key.shape[-2] == _tokens(self._grid):
            self._terms.append(self._mass_outside(query, key, kwargs.get("scale")))
        return out

    def _mass_outside(self, query: torch.Tensor, key: torch.Tensor, scale) -> torch.Tensor:
        """``[M, B]``: per pattern, the mean over heads and sampled queries of the softmax mass on keys outside it."""
        n = query.shape[-2]
        rows = torch.randperm(n, generator=self.generator)[: self.queries] if n > self.queries else torch.arange(n)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        probs = (torch.matmul(query[:, :, rows], key.transpose(-1, -2)) * scale).float().softmax(dim=-1)
        out = []
        for i, method in enumerate(self.methods):
            mask = self._masks.get((i, self._grid))
            if mask is None:
                mask = self._masks[(i, self._grid)] = pattern_mask(method, self._grid)
            inside = mask[..., rows, :].to(device=query.device, dtype=probs.dtype)  # [n_q, N] or [H, n_q, N]
            mass_in = (probs * inside).sum(dim=-1)  # [B, H, n_q]
            out.append((1.0 - mass_in).mean(dim=(1, 2)))
        return torch.stack(out)

    def outside(self) -> torch.Tensor:
        """``[B]`` (``[M, B]`` for a tuple of M patterns): attention mass outside the pattern per sample, averaged
        over the calls since the last read (all layers of the forward passes run inside the block); clears them.
        ValueError if none ran."""
        if not self._terms:
            raise ValueError("no self-attention call was watched: run the transformer inside the 'with' block")
        terms, self._terms = self._terms, []
        mean = torch.stack(terms).mean(dim=0)
        return mean[0] if self._one else mean


def _tokens(grid) -> int:
    return -1 if grid is None else grid[0] * grid[1] * grid[2]


