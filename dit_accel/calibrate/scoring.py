"""Scoring: each candidate's attention on the sampled q/k/v against dense, per layer, step bucket and head.

The error of a head is its share of the layer's squared error relative to the layer's dense output,
``||o_h - o*_h||^2 / ||o*||^2`` summed over the samples: summed over heads it is the layer's squared
relative L2 error, which is what the search allocates.

**One shared pass instead of an attention per candidate.** With the dense attention weights
``A = softmax(q k^T * scale)``, a candidate whose token mask is ``M`` outputs ``(A * M) v / rowsum(A * M)``
(a factor per row cancels, so ``exp(S - rowmax(S))`` gives the same), and dense attention, the reference,
is ``A v``. The pass takes the queries 64 rows at a time in one token order and computes ``A`` of those
rows once; per 64-key block ``j`` it forms ``P_j = A_j [v_j, 1]`` (the block's numerator and denominator in
one product). Each candidate then adds

- ``sum_j F[j] P_j`` over its *full* blocks (every real query-key pair visited): one small matmul for all
  candidates at once, ``F`` their 0/1 block rows (the reference's row is all ones);
- ``(A_j * M_j) [v_j, 1]`` over its *partial* blocks, from gathered blocks of ``A`` (one gather for the
  candidates with the same partial blocks).

Which candidates take the pass:

- a plain :class:`~dit_accel.plans.plan.LayoutPlan` with 64 x 64 blocks (Tile, GNA, Radial): its mask is its
  layout's (``layout.block_masks()`` and ``mask_table``, what ``to_dense_mask()`` reads) in the plan's token
  order (tiled when the plan has a permutation, else raster), sorted into full and partial blocks once per
  call and kept for every layer and bucket. Candidates in one token order share a pass: on the default
  grids one tiled pass (Tile, GNA) and, where Radial is a candidate, one raster pass (Radial, SLA).
- an :class:`~dit_accel.plans.plan.SLAPlan`, scored as calibration runs it, training-free (no projection): its
  linear branch is then not computed and SLA is top-k block-sparse attention over the critical key blocks
  of each query block, per (batch row, head), chosen from pooled scores that do not depend on ``topk``. The
  critical set is the first ``n_crit`` of one stable descending sort of those scores (as in
  :func:`~dit_accel.kernels.sla.common.classify_pooled`), so one classification and one sort per block-size
  pair give every candidate's blocks (the sets of different ``topk`` are nested); they join the raster pass
  as full blocks. When no layout needs a raster pass, one of their own costs about a dense attention, more
  than runs of the default top-k (:data:`_SLA_PASS_DENSITY`): they then run their own plans, unless their
  densities add up to that or no other pass runs.
- anything else (another plan kind, other block sizes, a per-head layout for another head count) runs its
  own ``plan.run`` with ``backend`` and is compared with the pass's dense output. The pass itself is
  PyTorch on the sample's device, whatever ``backend`` says.

Exactness: the pass is fp32, as the kernels are, so its errors equal the per-candidate runs' to fp32
round-off. A row whose visited keys hold almost none of the row's weight (``rowsum(A * M) < 2**-60``, when
they all lie far below the row's maximum: some or all of their terms may have underflowed) is recomputed
in fp64 from its own maximum, never left a NaN or a zero. Memory: (batch row, head) pairs are taken in
chunks so that one row block's scores take 4 MiB per torch thread, at most 32 MiB (:data:`_SCORE_BYTES`),
and a chunk's other buffers a few times that: no ``N x N`` buffer per pair. On one thread, 16 rows x 4 heads
on grid (7, 16, 16) grew the peak RSS by about 100 MB (the per-candidate runs: 2.4 GB).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels.sla import sla_block_counts, sla_classify, sla_density
from ..plans.plan import LayoutPlan, SLAPlan

__all__ = ["score_candidates"]

#: Query rows and keys per block of the shared pass.
_BLOCK = 64
#: fp32 scores of one row block of a chunk of (batch row, head) pairs, per torch thread and in all: small enough
#: for the chunk's buffers to stay in cache (one thread, 16 rows x 4 heads on grid (7, 16, 16): 2.6 s at 4 MiB,
#: 2.9 s at 16 MiB, 3.4 s at 32 MiB).
_SCORE_BYTES_PER_THREAD = 4 * 2**20
_SCORE_BYTES = 32 * 2**20
#: Below this visited weight (of a row's 1) a row is recomputed: above it, the terms lost to underflow (each
#: below 2^-126, with at most 2^20 keys) are under 2^-46 of the sum, far below fp32 round-off.
_UNDERFLOW = 2.0 ** -60
#: Rows per fp64 recomputation (each gathers its pair's keys: rows x N x D doubles).
_EXACT_ROWS = 64
#: SLA candidates take a raster-order pass that no layout candidate needs (no Radial) only when their visited
#: densities add up to this: such a pass costs what SLA runs of density 1.5 to 2 together cost (one CPU thread,
#: 16 rows x 4 heads x 32 dims, the default top-k 0.15, 0.3 and 0.5: grid (4, 12, 12) 0.13 s against 0.07 s
#: for density 1.1 together; grid (7, 16, 16) 0.90 s against 0.59 s for density 1.0).
_SLA_PASS_DENSITY = 2.0


def score_candidates(sampler, candidates: Sequence, layers: int, *, backend: str = "auto",
                     progress: Optional[Callable[[int], None]] = None) -> Dict[Tuple[int, int], torch.Tensor]:
    """``{(layer, bucket): errors [candidates, heads]}`` (fp64) for every (layer, bucket) the sampler kept.

    ``errors[i, h] = sum_rows ||o_i[:, h] - o*[:, h]||^2 / ||o*||^2`` with ``o_i`` candidate ``i``'s
    attention on the sample as its plan computes it (``candidates[i].method.plan(grid).run(q, k, v)``, SLA
    without a projection) and ``o*`` dense attention; dense candidates score 0. Block-sparse candidates (and
    SLA where that pays) are scored from a pass over the scores shared by all of them (module docstring);
    the others run their plan with ``backend``. ``progress(1)`` is called once per candidate and (layer,
    bucket).

    A joint-attention family's samples carry their text keys (:meth:`QKVSampler.bucket_text`): the video queries
    then attend them too, exactly in every candidate and in ``o*``, as a sparse run does (Plan.run's text merge).

    Example::

        errors = score_candidates(sampler, candidate_grid(sampler.grid), layers=30)
        errors[(0, 0)].shape        # (len(candidates), heads)
    """
    scorer = _Scorer(sampler.grid, candidates)
    out = {}
    for layer in range(layers):
        for bucket in range(len(sampler.buckets)):
            sample = sampler.bucket_samples(layer, bucket)
            if sample is None:
                if progress is not None:
                    progress(len(candidates))
                continue
            text = sampler.bucket_text(layer, bucket) if hasattr(sampler, "bucket_text") else None
            with torch.no_grad():
                out[(layer, bucket)] = scorer.errors(*sample, text=text, backend=backend, progress=progress)
    return out


class _Order:
    """A token order of a pass, padded to whole blocks: ``index[pos]`` is the raster token at ``pos`` (-1: padding)."""

    def __init__(self, index: torch.Tensor):
        n = index.numel()
        self.blocks = -(-n // _BLOCK)
        self.index = torch.cat([index, index.new_full((self.blocks * _BLOCK - n,), -1)])
        self.real = self.index >= 0

    def to(self, device) -> "_Order":
        """This order with its tensors moved to ``device`` (in place: a pass owns its order)."""
        self.index, self.real = self.index.to(device), self.real.to(device)
        return self

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[p, N, C]`` in raster order -> ``[p, Np, C]`` in this order, zero at padding."""
        src = torch.where(self.real, self.index, x.shape[1])
        return torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], 1).index_select(1, src)


def _layout_blocks(layout, order: _Order):
    """A layout's token mask on the pass's block grid (``order`` is the plan's own, and the layout's blocks
    are 64 x 64): ``(full, parts)`` with ``full`` bool ``[Hl, nb, nb]`` and ``parts = {query block: (key
    blocks [n], bool mask [Hl, 64, n * 64])}`` for the other visited blocks. Only real query-key pairs count
    (``A`` and ``v`` are zero at padding keys, padding queries are dropped): a partial block whose real pairs
    are all visited is full. From the layout's block lists, never its ``N x N`` mask."""
    visited, ids = layout.block_masks()
    hl, nb = visited.shape[0], order.blocks
    real = order.real.view(nb, _BLOCK)
    n_real = real.sum(1, dtype=torch.int32)
    full = visited & (ids < 0) & (n_real[:, None] > 0) & (n_real[None, :] > 0)
    h, qb, kb = (visited & (ids >= 0)).nonzero(as_tuple=True)
    tiles = layout.mask_table[ids[h, qb, kb].long()] & real[qb][:, :, None] & real[kb][:, None, :]
    count = tiles.sum((1, 2), dtype=torch.int32)
    whole = count == n_real[qb] * n_real[kb]
    full[h[whole], qb[whole], kb[whole]] = True
    keep = (count > 0) & ~whole
    h, qb, kb, tiles = h[keep], qb[keep], kb[keep], tiles[keep]
    parts = {}
    for q in qb.unique().tolist():
        sel = (qb == q).nonzero().flatten()
        kbs = kb[sel].unique()
        m = torch.zeros(hl, _BLOCK, kbs.numel(), _BLOCK, dtype=torch.bool)
        m[h[sel], :, torch.searchsorted(kbs, kb[sel]), :] = tiles[sel]  # (zero where a head sees the block full)
        parts[q] = (kbs, m.view(hl, _BLOCK, -1))
    return full, parts


class _Pass:
    """The candidates scored in one token order: the static block rows of the layouts (and the reference,
    the last of them), their partial blocks, and the SLA candidates whose blocks come per sample."""

    def __init__(self, order: _Order, members: List[int], masks: list, heads: int, sla: List[int], device):
        self.order = order.to(device)
        self.members, self.sla = members, sla
        nb = order.blocks
        lead = heads if any(full.shape[0] > 1 for full, _ in masks) else 1
        rows = [full.expand(lead, nb, nb) for full, _ in masks] + [torch.ones(lead, nb, nb, dtype=torch.bool)]
        self.full = torch.stack(rows, 2).float().to(device)  # [1 or heads, nb (queries), columns, nb (keys)]
        self.parts = [{qb: (kbs.to(device), m.to(device)) for qb, (kbs, m) in parts.items()} for _, parts in masks]
        # Per query block, the members with the same partial key blocks share one gather of A, and take one
        # product per nb / n of them (so their masked copies take no more room than the row block's scores).
        self.partial: Dict[int, list] = {}
        for qb in sorted({qb for parts in self.parts for qb in parts}):
            same: Dict[tuple, list] = {}
            for j, parts in enumerate(self.parts):
                if qb in parts:
                    same.setdefault(tuple(parts[qb][0].tolist()), []).append(j)
            for cols in same.values():
                kbs = self.parts[cols[0]][qb][0]
                step, products = max(1, nb // kbs.numel()), []
                for start in range(0, len(cols), step):
                    some = cols[start:start + step]
                    ms = [self.parts[j][qb][1] for j in some]
                    lead = heads if any(m.shape[0] > 1 for m in ms) else 1
                    stack = torch.stack([m.expand(lead, -1, -1) for m in ms], 1).float()  # [lead, members, 64, n * 64]
                    products.append((torch.tensor(some, device=device), stack))
                self.partial.setdefault(qb, []).append((kbs, products))
        self.ref = len(members)  # the reference's column
        self.columns = members + [-1] + sla  # candidate per column (-1: the reference)

    def run(self, q, k, v, heads, sla_blocks, errs, ref_out=None, text=None) -> torch.Tensor:
        """Add the chunk's squared errors to ``errs`` ``[p, candidates + 1]`` (fp64; the last column takes the
        reference's zeros) and return its ``||o*||^2`` (fp64). ``q`` (scaled), ``k``, ``v``: ``[p, N, D]`` in
        raster order; ``heads``: the pairs' heads; ``sla_blocks``: the pairs' SLA block rows ``[p, nb, n_sla, nb]``
        or None; ``ref_out`` ``[p, N, D]``: also receives the dense output; ``text``: the text keys, values with
        a ones column and bias ``([p, T, D], [p, T, D + 1], [p, T])``, which every column visits, or None."""
        order, nb = self.order, self.order.blocks
        p, _, d = q.shape
        qo, ko = order.gather(q), order.gather(k)
        vo = order.gather(torch.cat([v, v.new_ones(p, v.shape[1], 1)], -1))  # padding keys: zero, ones too
        kt = ko.transpose(1, 2)
        vb = vo.view(p, nb, _BLOCK, d + 1)
        bias = None
        if not bool(order.real.all()):
            bias = torch.zeros(order.real.shape, device=q.device).masked_fill_(~order.real, float("-inf"))
        full = self.full if self.full.shape[0] == 1 else self.full.index_select(0, heads)
        columns = torch.tensor(self.columns, device=q.device) % errs.shape[1]  # the reference -> the last
        norm = torch.zeros((), dtype=torch.float64, device=q.device)
        for qb in range(nb):
            rows = slice(qb * _BLOCK, (qb + 1) * _BLOCK)
            real = order.real[rows]
            s = torch.matmul(qo[:, rows], kt)
            if bias is not None:
                s.add_(bias)
            pt = None
            if text is not None:  # one softmax over [video, text] keys; the text part adds to every column
                n_video = s.shape[-1]
                s = torch.softmax(torch.cat([s, torch.baddbmm(text[2][:, None], qo[:, rows], text[0].transpose(1, 2))],
                                            -1), -1)
                pt = torch.bmm(s[..., n_video:], text[1])[:, None]  # [p, 1, 64, D + 1]
                eb = s[..., :n_video].reshape(p, _BLOCK, nb, _BLOCK)
            else:
                eb = torch.softmax(s, -1).view(p, _BLOCK, nb, _BLOCK)
            del s
            pk = torch.matmul(eb.transpose(1, 2), vb).view(p, nb, -1)  # P_j: [p, key blocks, 64 * (D + 1)]
            acc = torch.matmul(full[:, qb], pk)
            if sla_blocks is not None:
                acc = torch.cat([acc, torch.matmul(sla_blocks[:, qb], pk)], 1)
            acc = acc.view(p, -1, _BLOCK, d + 1)
            for kbs, products in self.partial.get(qb, ()):
                e_part = eb.index_select(2, kbs).view(p, 1, _BLOCK, -1)
                v_part = vb.index_select(1, kbs).view(p, -1, d + 1)
                for cols, m in products:
                    g = (e_part * (m if m.shape[0] == 1 else m.index_select(0, heads))).view(p, -1, e_part.shape[-1])
                    acc.index_add_(1, cols, torch.bmm(g, v_part).view(p, cols.numel(), _BLOCK, d + 1))
            if pt is not None:
                acc += pt
            total = acc[..., d]
            o = acc[..., :d] / total[..., None]
            low = (total < _UNDERFLOW) & real
            if bool(low.any()):
                self._exact(o, low, qb, qo, ko, vo, full, sla_blocks, heads, text)
            if not bool(real.all()):
                o = o[:, :, real]
            ref = o[:, self.ref]
            errs.index_add_(1, columns, torch.linalg.vector_norm(o - ref[:, None], dim=(2, 3)).double().pow(2))
            norm += ref.pow(2).sum(dtype=torch.float64)
            if ref_out is not None:
                ref_out[:, order.index[rows][real]] = ref
        return norm

    def _exact(self, o, low, qb, qo, ko, vo, full, sla_blocks, heads, text=None) -> None:
        """Recompute the rows ``low`` ``[p, columns, 64]`` of ``o`` in fp64 from each row's own maximum."""
        d = o.shape[-1]
        for chunk in low.nonzero().split(_EXACT_ROWS):
            pair, col, row = chunk.unbind(1)
            keys = self._key_masks(pair, col, row, qb, full, sla_blocks, heads)
            k_rows, v_rows = ko.index_select(0, pair).double(), vo.index_select(0, pair)[..., :d].double()
            if text is not None:  # the text keys: visited by every column, with their bias
                k_rows = torch.cat([k_rows, text[0].index_select(0, pair).double()], 1)
                v_rows = torch.cat([v_rows, text[1].index_select(0, pair)[..., :d].double()], 1)
            s = torch.einsum("nd,njd->nj", qo[pair, qb * _BLOCK + row].double(), k_rows)
            if text is not None:
                keys = torch.cat([keys, torch.ones_like(text[2].index_select(0, pair), dtype=torch.bool)], 1)
                s[:, s.shape[1] - text[2].shape[1]:] += text[2].index_select(0, pair).double()
            s.masked_fill_(~keys, float("-inf"))
            top = s.amax(-1, keepdim=True)
            w = torch.exp(s - torch.where(torch.isinf(top), torch.zeros_like(top), top))
            num = torch.einsum("nj,njd->nd", w, v_rows)
            den = w.sum(-1, keepdim=True)
            o[pair, col, row] = torch.where(den > 0, num / den, torch.zeros_like(num)).to(o.dtype)  # no key: 0

    def _key_masks(self, pair, col, row, qb, full, sla_blocks, heads) -> torch.Tensor:
        """bool ``[n, Np]``: the keys that query ``row`` of block ``qb`` visits under column ``col``, per pair."""
        n_static = full.shape[2]
        blocks = full[pair if full.shape[0] > 1 else torch.zeros_like(pair), qb, col.clamp_max(n_static - 1)]
        if sla_blocks is not None:
            sla_rows = sla_blocks[pair, qb, (col - n_static).clamp_min(0)]
            blocks = torch.where((col >= n_static)[:, None], sla_rows, blocks)
        keys = blocks.bool().repeat_interleave(_BLOCK, dim=1)
        for j, parts in enumerate(self.parts):
            part = parts.get(qb)
            hit = (col == j).nonzero().flatten()
            if part is None or not hit.numel():
                continue
            kbs, m = part
            m = m[heads[pair[hit]] if m.shape[0] > 1 else 0, row[hit]]  # [hits, n * 64]
            pos = (kbs[:, None] * _BLOCK + torch.arange(_BLOCK, device=kbs.device)).flatten()
            keys[hit[:, None], pos[None, :]] |= m
        return keys & self.order.real


class _Scorer:
    """One calibration's candidates sorted once into shared passes; :meth:`errors` scores one sample."""

    def __init__(self, grid, candidates: Sequence):
        self.grid = tuple(grid)
        self.candidates = list(candidates)
        self.plans: Dict[int, object] = {}
        self.layouts: List[Tuple[int, LayoutPlan, torch.Tensor]] = []  # (candidate, plan, the plan's token order)
        self.sla: Dict[Tuple[int, int], List[int]] = {}  # (block_q, block_k) -> candidates sharing a classification
        self.runs: List[int] = []  # candidates that run their own plan
        self._masks: Dict[int, tuple] = {}
        self._built: Dict[tuple, tuple] = {}
        by_method = {}
        for i, cand in enumerate(self.candidates):
            if cand.kind == "dense":
                continue
            plan = by_method.get(cand.method)
            if plan is None:
                plan = by_method[cand.method] = cand.method.plan(self.grid)
            self.plans[i] = plan
            index = _plan_order(plan)
            if type(plan) is SLAPlan and plan.params.block_q % _BLOCK == 0 and plan.params.block_k % _BLOCK == 0:
                self.sla.setdefault((plan.params.block_q, plan.params.block_k), []).append(i)
            elif index is not None:
                self.layouts.append((i, plan, index))
            else:
                self.runs.append(i)

    def _passes(self, heads: int, device) -> Tuple[List[_Pass], List[int]]:
        """The passes for ``heads`` heads and the candidates that run their plan instead (built once each)."""
        key = (heads, torch.device(device))
        if key in self._built:
            return self._built[key]
        runs = list(self.runs)
        groups: Dict[bytes, Tuple[torch.Tensor, List[int]]] = {}
        for i, plan, index in self.layouts:
            hl = plan.layout.num_heads
            if hl != heads and (hl > 1 or getattr(plan.method, "_source", None)):
                runs.append(i)  # its plan refuses this head count: plan.run says why
                continue
            groups.setdefault(index.numpy().tobytes(), (index, []))[1].append(i)
        raster = torch.arange(math.prod(self.grid))
        sla = [i for group in self.sla.values() for i in group]
        n = raster.numel()
        if sla and groups and raster.numpy().tobytes() not in groups and sum(
                sla_density(n, self.plans[i].params) for i in sla) < _SLA_PASS_DENSITY:
            runs += sla  # cheaper than a raster pass of their own
            sla = []
        if sla or not groups:  # (no pass at all: a raster one for the reference)
            groups.setdefault(raster.numpy().tobytes(), (raster, []))
        passes = []
        for index, members in groups.values():
            order = _Order(index)
            masks = []
            for i in members:
                if i not in self._masks:
                    self._masks[i] = _layout_blocks(self.plans[i].layout, order)
                masks.append(self._masks[i])
            on_raster = index.numel() == raster.numel() and bool((index == raster).all())
            passes.append(_Pass(order, members, masks, heads, sla if on_raster else [], device))
        self._built[key] = passes, sorted(runs)
        return self._built[key]

    def _sla_blocks(self, q, k) -> torch.Tensor:
        """fp32 ``[p, nb, n_sla, nb]`` of ``q``, ``k`` ``[p, N, D]`` (a chunk of pairs): each SLA candidate's
        critical blocks on the raster pass's grid."""
        n = q.shape[1]
        nb = -(-n // _BLOCK)
        blocks = torch.arange(nb, device=q.device) * _BLOCK
        rows = []
        for (block_q, block_k), group in self.sla.items():
            scores = sla_classify(q[None], k[None], self.plans[group[0]].params).scores[0]  # [p, nQ, nK], any topk's
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # classify_pooled's order
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=q.device)
                                                    .expand_as(order))
            rank = rank.index_select(1, blocks // block_q).index_select(2, blocks // block_k)
            for i in group:
                rows.append(rank < sla_block_counts(n, self.plans[i].params)[1])  # the top n_crit: nested sets
        return torch.stack(rows, 2).float()

    def errors(self, q, k, v, *, text=None, backend: str, progress) -> torch.Tensor:
        """fp64 ``[candidates, heads]`` of one sample ``q``, ``k``, ``v`` ``(B, H, N, D)``; ``text``: its text keys,
        values ``(B, H, T, D)`` and bias ``(B, T)`` (:meth:`QKVSampler.bucket_text`), attended by every query."""
        q, k, v = q.float(), k.float(), v.float()
        b, h, n, d = q.shape
        passes, runs = self._passes(h, q.device)
        scale = 1.0 / d ** 0.5
        pairs = b * h
        qr, ks, vs = q.reshape(pairs, n, d), k.reshape(pairs, n, d), v.reshape(pairs, n, d)
        qs = qr * scale
        errs = torch.zeros(pairs, len(self.candidates) + 1, dtype=torch.float64, device=q.device)
        ref = q.new_empty(pairs, n, d) if runs else None
        norm = torch.zeros((), dtype=torch.float64, device=q.device)
        budget = min(_SCORE_BYTES, _SCORE_BYTES_PER_THREAD * torch.get_num_threads())
        step = max(1, budget // (_BLOCK * max(ps.order.blocks for ps in passes) * _BLOCK * 4))
        heads = torch.arange(pairs, device=q.device) % h
        joint = None if text is None else _pair_text(text, h, q.device)
        for p0 in range(0, pairs, step):
            chunk = slice(p0, p0 + step)
            sla_blocks = self._sla_blocks(qr[chunk], ks[chunk]) if any(ps.sla for ps in passes) else None
            for i, ps in enumerate(passes):
                sq = ps.run(qs[chunk], ks[chunk], vs[chunk], heads[chunk], sla_blocks if ps.sla else None,
                            errs[chunk], ref[chunk] if ref is not None and i == 0 else None,
                            None if joint is None else tuple(t[chunk] for t in joint))
                if i == 0:  # (every pass computes the reference, in its own order)
                    norm += sq
        # A dense output of zeros (v all zero: a layer that adds nothing) is every candidate's output too: no error
        # (before: 0 / 0, NaN errors for every candidate, dense included, and the layer ran dense)
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        errors = (errs[:, :-1].view(b, h, -1).sum(0) / norm).T.contiguous()
        if progress is not None:
            for _ in range(len(self.candidates) - len(runs)):
                progress(1)
        for i in runs:
            if text is None:
                o, _ = self.plans[i].run(q, k, v, backend=backend)
            else:  # as the pipeline runs it: [text, video] keys, the text merged in exactly
                kt, vt, tb = (t.to(q.device, torch.float32) for t in text)
                mask = torch.cat([tb, tb.new_zeros(b, n)], 1)[:, None, None, :]  # (zero on the video keys)
                o, _ = self.plans[i].run(q, torch.cat([kt, k], 2), torch.cat([vt, v], 2), num_text=kt.shape[2],
                                         text_first=True, key_mask=mask, backend=backend, text_queries=False)
            errors[i] = (o.double() - ref.view(b, h, n, d).double()).pow(2).sum(dim=(0, 2, 3)) / norm
            if progress is not None:
                progress(1)
        return errors


def _pair_text(text, heads: int, device):
    """A sample's text ``(k, v, bias)`` per (batch row, head) pair: ``[p, T, D]``, ``[p, T, D + 1]`` (a ones column,
    the softmax's denominator) and ``[p, T]``, fp32 on ``device``."""
    kt, vt, bias = (t.to(device, torch.float32) for t in text)
    b, h, n, d = kt.shape
    vt = torch.cat([vt, vt.new_ones(b, h, n, 1)], -1)
    return kt.reshape(b * h, n, d), vt.reshape(b * h, n, d + 1), bias.repeat_interleave(heads, 0)


def _plan_order(plan) -> Optional[torch.Tensor]:
    """The raster token at each position of a plain layout plan's layout (its permutation's order, or raster
    order), or None when the plan is not one the shared pass takes."""
    if type(plan) is not LayoutPlan or plan.is_dense:
        return None
    index = torch.arange(plan.num_tokens) if plan.perm is None else plan.perm.order
    layout = plan.layout
    if layout.q_len != index.numel() or layout.kv_len != index.numel() or (layout.block_q, layout.block_k) != (
            _BLOCK, _BLOCK):
        return None
    return index
