"""Context parallelism for dit_accel's layers: Ulysses, Ring, and both at once (Diffusers' "unified").

Diffusers splits the token sequence across ranks (``transformer.enable_parallelism(
config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))``): each rank holds an equal,
contiguous share of the video tokens (and of the text tokens in joint models). For the
layers dit_accel wraps, dit_accel runs the collectives itself instead of Diffusers'
templated attention, for two reasons. Diffusers' templated attention recomputes plain SDPA
in its backward pass, outside any interception, so a sparse forward would get dense
gradients; and the joint models' gathered sequence is rank-interleaved (``[t0, v0, t1,
v1]``), which the sparse pattern must see as ``[text, video]``. With autograd-capable
collectives (``torch.distributed._functional_collectives``) the sparse op stays inside
autograd, and the reordering happens around it. (Registering a backend with Diffusers'
dispatcher would not help: its context-parallel path is the same templated attention.)

- Ulysses (``U > 1``): an all-to-all trades the sequence split for a head split; every rank
  then runs the plan on the whole sequence for ``H/U`` heads (per-head layouts use the
  global head indices), and a second all-to-all trades back.
- Ring (``R > 1``): every rank keeps its queries and gathers all keys and values, then
  attends key shard by key shard with the plan's layout sliced at global token indices,
  merging the shards by log-sum-exp (finite when a shard has no visible key). The plan's
  blocks must not straddle ranks: a rank's tokens must fill whole blocks (in tiled order,
  whole tile slabs), which is checked before any attention runs. The shards are
  gathered at once, not passed around the ring, so a rank holds all keys of its heads
  (as with Ulysses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..plans.plan import Plan, attend_with_lse
from ..kernels import merge_attention

__all__ = ["Split", "run_split", "check_split", "check_ring_layers", "check_ulysses_heads", "ulysses_heads_error",
           "check_per_head",
           "check_process_group", "mesh_error", "enable_context_parallel", "ring_first_says"]


def enable_context_parallel(transformer, config) -> None:
    """``transformer.enable_parallelism(config=config)``, also on a machine without an accelerator.

    Diffusers 0.42 places each rank on ``rank % torch.accelerator.device_count()`` when it resolves the
    config, a division by zero on a CPU-only machine. There every rank's device is the CPU and the device
    mesh is a CPU (gloo) mesh, so for this one call the transformer resolves its config with that placement;
    everything after it (the plan, the hooks, the processors) is Diffusers' own. ValueError (one line) where
    this Diffusers release resolves configs differently, or where the Ulysses degree does not divide the heads.
    """
    check_ulysses_heads(transformer, config)
    check_process_group(config)
    if torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=config)
        return
    if not hasattr(type(transformer), "_resolve_parallel_config"):
        raise ValueError("context parallelism on a machine without an accelerator needs Diffusers >= 0.42 (it "
                         "places each rank on `rank % torch.accelerator.device_count()`, a division by zero here); "
                         "upgrade Diffusers or run on GPUs")

    def resolve_on_cpu(config):
        from diffusers import ContextParallelConfig, ParallelConfig

        if isinstance(config, ContextParallelConfig):
            config = ParallelConfig(context_parallel_config=config)
        cp = config.context_parallel_config
        if cp is None:
            raise ValueError("context parallelism on a CPU: only a ContextParallelConfig is supported")
        mesh = cp.mesh or torch.distributed.device_mesh.init_device_mesh(
            device_type="cpu", mesh_shape=cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
        config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"),
                     mesh=mesh)
        transformer._parallel_config = config
        return config

    transformer._resolve_parallel_config = resolve_on_cpu  # this instance, this call only
    try:
        transformer.enable_parallelism(config=config)
    finally:
        del transformer._resolve_parallel_config


def mesh_error(cp) -> Optional[str]:
    """Why the ``mesh`` a ContextParallelConfig ``cp`` was given disagrees with its degrees, or None: dit_accel splits
    the sequence by the degrees and exchanges over the mesh's groups, so a mismatch gave wrong outputs without a word
    (``ring_degree=2`` with a mesh of ``ring`` 1 x ``ulysses`` 2 attended half the keys)."""
    mesh = getattr(cp, "mesh", None)
    if mesh is None:
        return None
    sizes = dict(zip(tuple(getattr(mesh, "mesh_dim_names", None) or ()), tuple(getattr(mesh, "shape", ()))))
    wanted = {"ring": cp.ring_degree or 1, "ulysses": cp.ulysses_degree or 1}
    if all(sizes.get(name) == size for name, size in wanted.items()):
        coordinate = getattr(mesh, "get_coordinate", None)
        if coordinate is None or coordinate() is not None:
            return None
        import torch.distributed as dist

        return (f"the ContextParallelConfig's mesh does not hold this process (rank {dist.get_rank()}), which would "
                "not take part in the exchanges: give every rank that runs the model a mesh it is in (one process "
                "per mesh position, the same mesh on each)")
    has = ", ".join(f"{name} {size}" for name, size in sizes.items()) or "no named dimensions"
    return (f"ContextParallelConfig(ulysses_degree={wanted['ulysses']}, ring_degree={wanted['ring']}) was given a mesh "
            f"of {has}: its 'ring' and 'ulysses' dimensions must have those sizes (mesh_dim_names=('ring', 'ulysses', "
            f"...), shape ({wanted['ring']}, {wanted['ulysses']}, ...)); build the mesh with the degrees, or leave "
            "mesh out")


def check_process_group(config) -> None:
    """Refuse, before the model changes, context parallelism without a process group that holds its ranks, or with
    a mesh that disagrees with its degrees (torch's and Diffusers' errors otherwise: "environment variable RANK
    expected", "Mesh should not be bigger than default world size", or, for a mesh, wrong outputs)."""
    import torch.distributed as dist

    cp = getattr(config, "context_parallel_config", config)
    problem = mesh_error(cp)
    if problem:
        raise ValueError(problem)
    degree = (getattr(cp, "ulysses_degree", 1) or 1) * (getattr(cp, "ring_degree", 1) or 1)
    launch = f"start {degree} processes with `torchrun --nproc_per_node {degree} ...`"
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"context parallelism over {degree} ranks needs a process group, and torch.distributed is "
                         f"not initialised in this process: {launch} and call torch.distributed.init_process_group() "
                         "in each before enabling it (dit-accel's --cp does both)")
    if degree > dist.get_world_size():
        raise ValueError(f"context parallelism with ulysses_degree x ring_degree = {degree} needs {degree} ranks, "
                         f"and the process group has {dist.get_world_size()}: {launch}, or lower the degrees")


def check_ulysses_heads(transformer, config) -> None:
    """Refuse a Ulysses degree that does not divide the model's heads before the model changes: found otherwise
    only at the first attention call, after the model loaded and the prompt was encoded. Every ``*num_attention_heads``
    field of the config is split (LTX-2's ``audio_num_attention_heads`` too: its audio attention is split as well)."""
    cp = getattr(config, "context_parallel_config", config)
    model_config = getattr(transformer, "config", None)  # (Diffusers' FrozenDict; a plain object in stubs)
    values = dict(model_config) if isinstance(model_config, dict) else dict(getattr(model_config, "__dict__", {}))
    problem = ulysses_heads_error(type(transformer).__name__, values, getattr(cp, "ulysses_degree", 1) or 1)
    if problem:
        raise ValueError(problem)


def ulysses_heads_error(class_name: str, values: dict, ulysses: int) -> Optional[str]:
    """Why a Ulysses degree ``ulysses`` cannot split the heads of a transformer of ``class_name`` whose config is
    ``values`` (a dict, as its config.json holds it), or None: the one rule of :func:`check_ulysses_heads`, also
    read from a model's folder before it loads."""
    if ulysses <= 1:
        return None
    for field in sorted(values, key=lambda f: (f != "num_attention_heads", f)):  # (the main one said first)
        heads = values[field]
        if not (field.endswith("num_attention_heads") and isinstance(heads, int) and not isinstance(heads, bool)
                and heads > 0 and heads % ulysses):
            continue
        fits = ", ".join(str(n) for n in range(2, heads + 1) if heads % n == 0) or "none above 1"
        return (f"context parallelism with ulysses_degree={ulysses} (--cp ulysses={ulysses}) splits the "
                f"attention heads into {ulysses} equal groups, but {class_name} has "
                f"{field}={heads}: use a Ulysses degree that divides it ({fits}), or ring")
    return None


@dataclass(frozen=True)
class Split:
    """How context parallelism splits the sequence of the layers (read from Diffusers' config)."""

    ulysses: int
    ring: int
    ulysses_rank: int
    ring_rank: int
    ulysses_group: object
    ring_group: object

    @classmethod
    def of(cls, parallel_config) -> Optional["Split"]:
        """The split of a Diffusers ``ParallelConfig`` (None without context parallelism)."""
        cp = getattr(parallel_config, "context_parallel_config", None)
        if cp is None or cp.ulysses_degree * cp.ring_degree == 1:
            return None
        if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
            raise ValueError("dit_accel runs context parallelism with equal shares per rank; ulysses_anything / "
                             "ring_anything (uneven shares) are not supported. Build the ContextParallelConfig "
                             "without them, and choose sizes whose token count is a multiple of the number of ranks")
        problem = mesh_error(cp)
        if problem:
            raise ValueError(problem)
        return cls(cp.ulysses_degree, cp.ring_degree, cp._ulysses_local_rank, cp._ring_local_rank,
                   cp._ulysses_mesh.get_group(), cp._ring_mesh.get_group())

    @property
    def world(self) -> int:
        return self.ulysses * self.ring

    def shards(self, num_video: int) -> List[Tuple[int, int]]:
        """Video rows ``(start, stop)`` each ring member holds after the Ulysses gather, in ring order."""
        share = num_video // self.ring
        return [(r * share, (r + 1) * share) for r in range(self.ring)]

    def heads(self, local_heads: int) -> Tuple[int, int]:
        """Global head indices this rank attends for after the Ulysses exchange (``local_heads = H / U``)."""
        return self.ulysses_rank * local_heads, (self.ulysses_rank + 1) * local_heads


def check_split(split: Split, num_video: int, num_text: int, plans) -> None:
    """Refuse, before any attention, a sequence that does not split into equal whole shares: on every rank, with the
    same words (the layers' plans asked in layer order; a set of them was asked in the order of their addresses,
    which differ between the ranks, so two ranks could refuse one call with two different messages)."""
    advice = {"video": "choose a frame count or resolution whose video token count is one",
              "text": "choose a text length (max_sequence_length) that is one"}
    for what, count in (("video", num_video), ("text", num_text)):
        if count % split.world:
            raise ValueError(f"context parallelism over {split.world} ranks splits the {count} {what} tokens into "
                             f"equal shares, and {count} is not a multiple of {split.world}: {advice[what]} (or "
                             "use fewer ranks)")
    if split.ring > 1:
        shards = split.shards(num_video)
        for plan in dict.fromkeys(p for p in plans if p is not None and not p.is_dense):
            for shard in shards:
                try:
                    plan.check_part(shard)
                except ValueError as err:
                    raise ValueError(_ring_refusal(str(err), split, num_video)) from None


def _ring_refusal(problem: str, split: Split, num_video: int) -> str:
    """A plan's refusal of a ring rank's share (:meth:`~dit_accel.plans.plan.Plan.check_part`), said as what it is:
    ring context parallelism's split, with the other way out, Ulysses, which any evenly split grid takes (before: a
    bare "tokens 0..31 ... do not fill whole blocks: split the sequence ...", which named neither)."""
    problem = problem.removeprefix("dit_accel: ")
    if "Ulysses" in problem:  # (VSA's says it already)
        return f"dit_accel: {problem}"
    return (f"dit_accel: ring context parallelism over {split.ring} ranks gives each rank {num_video // split.ring} "
            f"of the {num_video} video tokens, and {problem}; or split by Ulysses alone (ulysses_degree="
            f"{split.world}, ring_degree=1; --cp ulysses={split.world}), which takes any grid whose tokens split "
            "evenly, where the model's attention heads divide by it")


def check_per_head(schedule, parallel_config) -> None:
    """Refuse context parallelism for a schedule that may run a per-head config (``PerHead``, a calibrated plan's
    per-head entries) before the model runs: otherwise found at the first call that reaches one, which for a
    plan's later phase is part way through a generation."""
    from ..plans.per_head import CONTEXT_PARALLEL_REFUSAL

    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or (cp.ulysses_degree or 1) * (cp.ring_degree or 1) == 1:
        return
    for method in schedule.methods():
        plan = getattr(method, "sparse_plan", None)  # a SparsePlan's PlanMethod: every config it names
        if any(m.name == "per_head" for m in (plan.methods() if plan is not None else (method,))):
            raise ValueError(CONTEXT_PARALLEL_REFUSAL)


# Diffusers attention backends whose step of Diffusers' own Ring raises "... does not support return_lse"
_NO_LSE = frozenset({"native", "_native_npu", "_native_efficient", "_native_math", "_native_xla", "xformers"})


def check_ring_layers(transformer, preset, parallel_config) -> None:
    """Refuse Ring up front where Diffusers' own Ring would fail mid-call in a layer dit_accel leaves alone.

    Such layers (``preset.ring_unwrapped``, LTX-Video's cross-attention) still run Diffusers' templated Ring,
    which merges shards by log-sum-exp; the native backend returns none and raises on the first step.
    """
    cp = getattr(parallel_config, "context_parallel_config", None)
    if not preset.ring_unwrapped or cp is None or cp.ring_degree == 1:
        return
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = str(getattr(_AttentionBackendRegistry.get_active_backend()[0], "value", "native"))
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        # (a block wrapped in torch.compile is named through its _orig_mod, as attention_modules reads it)
        if preset.matches(name.replace("._orig_mod.", ".")) or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        backend = default if backend is None else str(getattr(backend, "value", backend))
        if backend in _NO_LSE:
            raise ValueError(f"dit_accel: {type(transformer).__name__} under Ring context parallelism fails in "
                             f"Diffusers' own {preset.ring_unwrapped}, which dit_accel leaves to it ({name}: the "
                             f"{backend!r} attention backend returns no log-sum-exp, which Diffusers' Ring needs): "
                             "use Ulysses only (ulysses_degree; --cp ulysses=N)")


# ------------------------------------------------------------------ collectives (autograd-capable)
def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def _wait(x):
    funcol = _funcol()
    return funcol.wait_tensor(x) if hasattr(funcol, "wait_tensor") else x


def ulysses_gather(x: torch.Tensor, split: Split) -> torch.Tensor:
    """``(B, H, S, D)`` sequence share -> ``(B, H/U, U*S, D)``: this rank's heads, the group's shares in order."""
    b, h, s, d = x.shape
    u = split.ulysses
    if h % u:
        raise ValueError(f"Ulysses over {u} ranks splits the {h} attention heads into equal groups, and {h} is not "
                         f"a multiple of {u}: use a ulysses degree that divides the head count (or ring)")
    x = x.reshape(b, u, h // u, s, d).transpose(0, 1).contiguous()  # [U, B, h, S, D]: part p goes to rank p
    x = _wait(_funcol().all_to_all_single_autograd(x, None, None, split.ulysses_group))
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)


def ulysses_scatter(x: torch.Tensor, split: Split) -> torch.Tensor:
    """Inverse of :func:`ulysses_gather`: ``(B, H/U, U*S, D)`` -> ``(B, H, S, D)``."""
    b, h, us, d = x.shape
    u = split.ulysses
    x = x.reshape(b, h, u, us // u, d).permute(2, 0, 1, 3, 4).contiguous()  # [U, B, h, S, D]: share p to rank p
    x = _wait(_funcol().all_to_all_single_autograd(x, None, None, split.ulysses_group))
    return x.transpose(0, 1).reshape(b, u * h, us // u, d)


def ring_first_says(value: bool, split: Split, device) -> bool:
    """The first ring rank's ``value`` on every ring rank of this head group (one small collective): a decision
    that every ring rank must take alike, such as whether to make the capture's ring gather."""
    import torch.distributed as dist

    flag = torch.tensor([int(bool(value)) if split.ring_rank == 0 else 0], device=device)
    dist.all_reduce(flag, group=split.ring_group)
    return bool(flag.item())


def ring_gather(x: torch.Tensor, split: Split, dim: int = 2) -> torch.Tensor:
    """Concatenate the ring members' tensors along ``dim`` (ring order), with an autograd backward."""
    return _wait(_funcol().all_gather_tensor_autograd(x.contiguous(), dim, split.ring_group))


def _gather_mask(mask: Optional[torch.Tensor], split: Split) -> Optional[torch.Tensor]:
    """A ``(B, 1, 1, S_local)`` key mask of this rank's share -> the mask of every share (no gradient)."""
    if mask is None:
        return None
    import torch.distributed as dist

    for size, group in ((split.ulysses, split.ulysses_group), (split.ring, split.ring_group)):
        if size > 1:
            parts = [torch.empty_like(mask) for _ in range(size)]
            dist.all_gather(parts, mask.contiguous(), group=group)
            mask = torch.cat(parts, dim=-1)
    return mask


# ------------------------------------------------------------------ one attention call
def _split_joint(x: torch.Tensor, chunks: int, num_text: int, text_first: bool):
    """``(B, h, chunks*S, D)`` of ``chunks`` shares ``[text, video]`` (or ``[video, text]``) -> text, video."""
    b, h, cs, d = x.shape
    x = x.reshape(b, h, chunks, cs // chunks, d)
    text = x[:, :, :, :num_text] if text_first else x[:, :, :, cs // chunks - num_text:]
    video = x[:, :, :, num_text:] if text_first else x[:, :, :, :cs // chunks - num_text]
    return text.reshape(b, h, -1, d), video.reshape(b, h, -1, d)


def _join(text: torch.Tensor, video: torch.Tensor, chunks: int, text_first: bool) -> torch.Tensor:
    b, h, _, d = video.shape
    parts = [text.reshape(b, h, chunks, -1, d), video.reshape(b, h, chunks, -1, d)]
    return torch.cat(parts if text_first else parts[::-1], dim=3).reshape(b, h, -1, d)


def run_split(plan: Optional[Plan], q, k, v, *, split: Split, num_text: int, text_first: bool, key_mask,
              scale: Optional[float], backend: str, proj=None, capture=None, whole: bool = False):
    """One attention call of a wrapped layer under context parallelism.

    Args:
        plan: the layer's plan, or None (dense by the schedule).
        q, k, v: this rank's share ``(B, H, S_local, D)``: ``num_text`` text tokens (all ranks
            together) and the video tokens, in the order the model uses (``text_first``).
        key_mask: this rank's bool key-padding mask ``(B, 1, 1, S_local)`` or None.
        capture: ``capture(q, k, v, heads, text=)`` of the whole video sequence of this rank's heads (``text``: the
            text keys, values and their key mask ``(B, T)``, or None), called by
            every ring rank of each head group, which all hold it (None: no capture; every ring rank passes one
            or none alike, the first ring rank's decision: :func:`ring_first_says`): the first one saves it.
        whole: the model split its one sequence contiguously (``Preset.split_whole``): the shares are not
            ``[text, video]`` each, and the Ulysses gather gives back the model's order.
    Returns ``(o (B, H, S_local, D), density or None, the kernel backend it ran or None)``.
    """
    if whole and num_text and split.ring > 1:
        raise ValueError("dit_accel: this model's context parallelism splits its one joint sequence contiguously, "
                         "so a ring rank's share mixes dense and video tokens, which dit_accel's ring path cannot "
                         "place; use Ulysses (ulysses_degree) only for it")
    text_local = num_text // split.world
    if split.ulysses > 1:
        q, k, v = (ulysses_gather(x, split) for x in (q, k, v))
    chunks, text_part = (1, num_text) if whole else (split.ulysses, text_local)
    mask = _gather_mask(key_mask, split)
    tq, vq = _split_joint(q, chunks, text_part, text_first)
    tk, vk = _split_joint(k, chunks, text_part, text_first)
    tv, vv = _split_joint(v, chunks, text_part, text_first)
    if split.ring > 1:
        tk, vk, tv, vv = (ring_gather(x, split) for x in (tk, vk, tv, vv))
    heads = split.heads(q.shape[1])
    mask_text = mask_video = None
    if mask is not None:  # gathered shares in (ring, ulysses) order, each [text, video] like the tokens
        m_text, m_video = _split_joint(mask.reshape(mask.shape[0], 1, -1, 1), *((1, num_text) if whole else (
            split.world, text_local)), text_first)
        mask_text, mask_video = m_text.reshape(mask.shape[0], -1), m_video.reshape(mask.shape[0], -1)
        if not bool(mask_video.all()):  # (the same gathered mask on every rank: all refuse alike)
            hidden = int((~mask_video).sum())
            raise ValueError(f"dit_accel: this call's key-padding mask hides {hidden} video key(s) (over the batch), "
                             "which context parallelism does not place (it masks text keys only): pass a mask over "
                             "the text tokens alone, or run this call without context parallelism")
    if capture is not None:  # (the text keys too: calibration scores the attention a run computes with them)
        with torch.no_grad():
            all_q = ring_gather(vq, split) if split.ring > 1 else vq
        capture(all_q, vk, vv, heads, text=(tk, tv, mask_text) if tk.shape[2] else None)
    if plan is None or plan.is_dense:  # one SDPA over the whole sequence in the model's order, as without splitting
        order = [(a, b) if text_first else (b, a) for a, b in ((tq, vq), (tk, vk), (tv, vv))]
        keys_mask = None if mask is None else torch.cat([mask_text, mask_video] if text_first else
                                                        [mask_video, mask_text], 1)[:, None, None, :]
        q_all, k_all, v_all = (torch.cat(pair, 2) for pair in order)
        out = F.scaled_dot_product_attention(q_all, k_all, v_all, attn_mask=keys_mask, scale=scale)
        n_first = order[0][0].shape[2]
        o_text, o_video = (out[:, :, :n_first], out[:, :, n_first:]) if text_first else (
            out[:, :, n_first:], out[:, :, :n_first])
        return _finish(o_text, o_video, q.dtype, chunks, text_first, split), None, None
    scale_value = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    num_video = vk.shape[2]
    if split.ring > 1:
        o_video, lse, extra, density = plan.attend_part(
            vq, vk, vv, rows=split.shards(num_video)[split.ring_rank], shards=split.shards(num_video), scale=scale,
            backend=backend, proj=proj, heads=heads)
    else:
        o_video, lse, extra, density = plan.attend(vq, vk, vv, scale=scale, backend=backend, proj=proj, heads=heads)
    if tk.shape[2]:
        o_text_keys, lse_text = attend_with_lse(vq, tk, tv, mask_text, scale_value)
        o_video, _ = merge_attention(o_video, lse, o_text_keys, lse_text)
        keys_mask = None if mask_text is None else torch.cat(
            [mask_text, torch.ones_like(mask_text[:, :1]).expand(-1, num_video)], 1)[:, None, None, :]
        o_text = F.scaled_dot_product_attention(tq, torch.cat([tk, vk], 2), torch.cat([tv, vv], 2),
                                                attn_mask=keys_mask, scale=scale)
    else:
        o_text = tq
    if extra is not None:
        o_video = o_video + extra  # (an fp32 extra: the sum rounded once, below)
    return _finish(o_text, o_video, q.dtype, chunks, text_first, split), density, _ran_backend(plan, vq, vk, vv,
                                                                                             split, backend)


def _ran_backend(plan: Plan, vq, vk, vv, split: Split, backend: str) -> Optional[str]:
    """The kernel backend of this rank's part of a call, for the statistics: asked with the tensors as the plan ran
    them (the whole video sequence of this rank's heads; under Ring its query rows against one key shard at a time,
    which a layout plan's :meth:`~dit_accel.plans.plan.Plan.attend_part` hands the block-sparse kernels), not with
    this rank's share of the layer's input (before: a ring run on a CPU was reported as the one-call
    ``dense-masked`` path, which ring attention never takes; it ran ``torch``). Under Ulysses with a layout per
    head: this rank's heads' backend (their layout, as :meth:`~dit_accel.plans.plan.LayoutPlan.attend` ran them),
    a per-rank answer as the rest of the rank's statistics; before, None, and the call was labelled with the
    backend of every head's layout asked with this rank's share of the tokens, which ran nowhere."""
    from ..kernels.backends import resolve
    from ..kernels.request import Request
    from ..plans.plan import LayoutPlan

    if not isinstance(plan, LayoutPlan) or (split.ring == 1 and plan.layout.num_heads == 1):
        return plan.backend_for(vq, vk, vv, backend)
    if split.ring == 1:  # a layout per head, of which this rank runs some heads: theirs
        return plan.backend_for(vq, vk, vv, backend, heads=split.heads(vq.shape[1]))
    start, stop = split.shards(vk.shape[2])[0]  # ring: the kernels' choice for one key shard
    return resolve("block_sparse", backend, Request.of(vq, vk[:, :, start:stop], vv[:, :, start:stop],
                                                       plan.layout.block_q, plan.layout.block_k))


def _finish(o_text, o_video, dtype, chunks: int, text_first: bool, split: Split) -> torch.Tensor:
    """Back to this rank's share: shares interleaved again, then the inverse Ulysses exchange."""
    out = _join(o_text.to(dtype), o_video.to(dtype), chunks, text_first)
    return ulysses_scatter(out, split) if split.ulysses > 1 else out
