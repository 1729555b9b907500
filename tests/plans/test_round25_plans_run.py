"""Round 25: a calibrated plan runs exactly what it says, per layer, head and step, on tiny models.

The oracle is independent of dit_accel's mask code: each method's token mask is written here from its pattern
definition in METHODS.md (Tile: tiles within ``w // 2`` of the clamped centre tile; GNA: NATTEN's window; Radial:
the power-of-two band rule reduced to blocks), and every self-attention SDPA call of the unmodified model is
replaced by fp64 masked-dense attention under the mask the plan names for that (layer, step, head). Each test also
shows that a corrupted plan (heads swapped, a step shifted) is caught, so the comparison can fail.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_accel
from dit_accel import GNA, Dense, PerHead, Phase, Radial, SparsePlan, Tile
from dit_accel.models import tiny as T


# ------------------------------------------------------------------ masks from METHODS.md
def _tile_1d(extent, tile, window):
    n = -(-extent // tile)
    i = torch.arange(extent)
    centre = (i // tile).clamp(window // 2, max(n - 1 - window // 2, window // 2))
    return ((i[None, :] // tile) - centre[:, None]).abs() <= window // 2


def _gna_1d(extent, kernel):
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    centre = torch.arange(extent).clamp(left, extent - 1 - right)
    j = torch.arange(extent)[None, :]
    return (j >= (centre - left)[:, None]) & (j <= (centre + right)[:, None])


def _separable(grid, relations):
    idx = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    mask = torch.ones(len(idx), len(idx), dtype=torch.bool)
    for d, rel in enumerate(relations):
        mask &= rel[idx[:, d][:, None], idx[:, d][None, :]]
    return mask


def tile_mask(grid, tile, window):
    return _separable(grid, [_tile_1d(g, t, w) for g, t, w in zip(grid, tile, window)])


def gna_mask(grid, kernel):
    return _separable(grid, [_gna_1d(g, k) for g, k in zip(grid, kernel)])


def radial_mask(grid, decay, block, sinks=(0,)):
    frames, s = grid[0], grid[1] * grid[2]
    n, ref, pos = frames * s, 2 ** s.bit_length(), torch.arange(s)
    tokens = torch.zeros(n, n, dtype=torch.bool)
    for qf in range(frames):
        for kf in range(frames):
            dist = abs(qf - kf)
            if kf in sinks or dist <= 1:
                band = torch.ones(s, s, dtype=torch.bool)
            else:
                width = ref / 2 ** dist.bit_length()
                if width < block and dist % int(block / width) != 0:
                    continue
                band = (pos[:, None] - pos[None, :]).abs() <= max(decay * width, block)
            tokens[qf * s:(qf + 1) * s, kf * s:(kf + 1) * s] = band
    out = torch.zeros(n, n, dtype=torch.bool)
    for a in range(0, n, block):
        for b in range(0, n, block):
            blk = tokens[a:a + block, b:b + block]
            filled = blk.any(0).sum()  # a block is kept iff > 60% of its non-empty columns are > 1/3 inside the band
            if filled and (blk.sum(0) > blk.shape[0] / 3).sum() > 0.6 * filled:
                out[a:a + block, b:b + block] = True
    return out


class MaskedReference(TorchFunctionMode):
    """Every self-attention SDPA call over the ``n`` video tokens (plus text: first when ``text_first``) runs fp64
    masked-dense attention under ``masks_for(call)``: None (dense), ``[N, N]`` or per head ``[H, N, N]``."""

    def __init__(self, masks_for, n, text_first=False):
        super().__init__()
        self.masks_for, self.n, self.text_first, self.calls = masks_for, n, text_first, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = dict(zip(("query", "key", "value"), args), **kwargs)
        if func is not F.scaled_dot_product_attention or call["key"].shape[2] != call["query"].shape[2] or \
                call["query"].shape[2] < self.n:  # (cross-attention, the text encoder)
            return func(*args, **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        mask = self.masks_for(self.calls)
        self.calls += 1
        s = q.shape[2]
        full = torch.ones(q.shape[1], s, s, dtype=torch.bool)
        if mask is not None:
            video = slice(s - self.n, s) if self.text_first else slice(0, self.n)
            full[:, video, video] = mask
        scale = call.get("scale") or 1 / math.sqrt(q.shape[-1])
        scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~full, float("-inf"))
        return (scores.softmax(-1) @ v.double()).to(q.dtype)


# ------------------------------------------------------------------ Wan: per layer, head and step
WAN_GRID = (4, 4, 8)  # 128 tokens: two 64-token radial blocks
N_WAN = math.prod(WAN_GRID)
TILE = Tile(tile=(2, 2, 4), window=(1, 1, 1))
GNA5 = GNA(kernel_size=(3, 3, 5))
RADIAL = Radial(decay=0.5, block_size=64)
MASK = {TILE: tile_mask(WAN_GRID, (2, 2, 4), (1, 1, 1)), GNA5: gna_mask(WAN_GRID, (3, 3, 5)),
        RADIAL: radial_mask(WAN_GRID, 0.5, 64), Dense(): torch.ones(N_WAN, N_WAN, dtype=torch.bool)}


def _mixed_plan(swap_heads=False):
    head = (RADIAL, TILE) if swap_heads else (TILE, RADIAL)
    return SparsePlan((Phase(0, 1), Phase(1, 3, {0: PerHead(head), 1: GNA5}),
                       Phase(3, None, {0: RADIAL, 1: PerHead((Dense(), TILE))})), num_layers=2, num_heads=2)


def _expected(plan, layer, step):  # the plan read as data, not through dit_accel's schedule
    phase = next((p for p in plan.phases if p.covers(step)), None)
    method = Dense() if phase is None else phase.method(layer)
    heads = method.methods if isinstance(method, PerHead) else (method, method)
    return torch.stack([MASK[m] for m in heads])


@pytest.fixture(scope="module")
def wan():
    model = T.build_tiny_transformer("wan")
    return model, T.tiny_transformer_inputs("wan", model, grid=WAN_GRID)


@torch.no_grad()
def _run_plan(model, kwargs, plan, steps):
    handle = dit_accel.apply(model, plan, backend="torch")
    try:
        outs = []
        for step in range(steps):
            handle.set_step(step, steps)
            outs.append(model(**kwargs)[0])
        return outs
    finally:
        handle.remove()


@torch.no_grad()
def test_a_mixed_plan_runs_each_layers_heads_method_at_each_step(wan):
    model, kwargs = wan
    plan, steps = _mixed_plan(), 5
    outs = _run_plan(model, kwargs, plan, steps)
    for step, out in enumerate(outs):
        with MaskedReference(lambda call: _expected(plan, call % 2, step), N_WAN) as mode:
            ref = model(**kwargs)[0]
        assert mode.calls == 2
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=f"step {step}")
    # the oracle can fail: the same plan with the heads of layer 0 swapped is another model output
    with MaskedReference(lambda call: _expected(_mixed_plan(swap_heads=True), call % 2, 1), N_WAN):
        swapped = model(**kwargs)[0]
    assert (swapped - outs[1]).abs().max() > 1e-3


@torch.no_grad()
def test_a_saved_and_loaded_plan_runs_exactly_as_the_original(wan, tmp_path):
    model, kwargs = wan
    plan = _mixed_plan()
    plan.save(tmp_path / "plan.json")
    loaded = SparsePlan.load(tmp_path / "plan.json")
    assert loaded == plan
    for a, b in zip(_run_plan(model, kwargs, plan, 4), _run_plan(model, kwargs, loaded, 4)):
        assert torch.equal(a, b)


def test_a_plan_for_another_head_count_is_refused_before_the_model_changes():
    import diffusers

    config = dict(T.TRANSFORMERS["wan"].config, num_attention_heads=4, attention_head_dim=16)
    model = diffusers.WanTransformer3DModel(**config).eval()
    processors = dict(model.attn_processors)
    for plan, message in ((_mixed_plan(), "is for 2 heads per attention layer; this model's layers have 4"),
                          (SparsePlan((Phase(0, None, {0: PerHead((TILE, RADIAL))}),), num_layers=2),
                           "give layer 0 2 per-head methods; that layer of this model has 4 heads")):
        with pytest.raises(ValueError, match=message):
            dit_accel.apply(model, plan)
        assert dict(model.attn_processors) == processors


# ------------------------------------------------------------------ FLUX: joint attention, text first
FLUX_GRID = (8, 8)


@torch.no_grad()
def test_a_per_head_plan_on_joint_attention_keeps_text_dense_and_heads_exact():
    model = T.build_tiny_transformer("flux")
    kwargs = T.tiny_transformer_inputs("flux", model, grid=FLUX_GRID)
    n = math.prod(FLUX_GRID)
    tile, gna = Tile(tile=(2, 4), window=(1, 1)), GNA(kernel_size=(3, 5))
    masks = {tile: tile_mask(FLUX_GRID, (2, 4), (1, 1)), gna: gna_mask(FLUX_GRID, (3, 5)),
             Dense(): torch.ones(n, n, dtype=torch.bool)}
    plan = SparsePlan((Phase(0, 1), Phase(1, None, {0: PerHead((gna, tile)), 1: PerHead((Dense(), gna))})),
                      num_layers=2, num_heads=2)
    outs = _run_plan(model, kwargs, plan, 2)
    for step, out in enumerate(outs):
        def masks_for(call, step=step):
            method = plan.phases[0 if step == 0 else 1].method(call % 2)
            return torch.stack([masks[m] for m in getattr(method, "methods", (method, method))])
        with MaskedReference(masks_for, n, text_first=True) as mode:
            ref = model(**kwargs)[0]
        assert mode.calls == 2
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=f"step {step}")
    assert (outs[1] - outs[0]).abs().max() > 1e-3  # step 1 is sparse: the comparison can fail


# ------------------------------------------------------------------ classifier-free guidance: one step, two calls
@pytest.fixture(scope="module")
def wan_pipe():
    return T.build_tiny_pipeline("tiny-wan")


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["one-call-per-step", "cfg-two-calls-per-step"])
@torch.no_grad()
def test_the_plans_step_advances_once_per_denoising_step(wan_pipe, guidance):
    grid, steps = (5, 4, 4), 2  # 17 frames of 64x64
    n = math.prod(grid)
    tile, gna = Tile(tile=(1, 2, 2), window=(1, 1, 1)), GNA(kernel_size=(3, 3, 3))
    masks = {tile: tile_mask(grid, (1, 2, 2), (1, 1, 1)), gna: gna_mask(grid, (3, 3, 3))}
    plan = SparsePlan((Phase(0, 1, {0: gna}), Phase(1, None, {0: PerHead((tile, gna)), 1: tile})),
                      num_layers=2, num_heads=2)
    calls_per_step = 2 if guidance > 1 else 1

    def masks_for(call, shift=0):  # step from the call count: 2 layers x calls_per_step per step
        layer, step = call % 2, call // 2 // calls_per_step + shift
        method = next((p.method(layer) for p in plan.phases if p.covers(step)), Dense())
        heads = getattr(method, "methods", (method, method))
        return None if all(isinstance(m, Dense) for m in heads) else torch.stack([masks[m] for m in heads])

    def run(mode=None):
        args = dict(prompt="a cat", num_frames=17, height=64, width=64, num_inference_steps=steps,
                    max_sequence_length=16, guidance_scale=guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
        if mode is None:
            return wan_pipe(**args).frames
        with mode:
            return wan_pipe(**args).frames

    handle = dit_accel.apply(wan_pipe, plan, backend="torch")
    try:
        out = run()
    finally:
        handle.remove()
    mode = MaskedReference(masks_for, n)
    torch.testing.assert_close(out, run(mode), atol=2e-5, rtol=2e-5)
    assert mode.calls == 2 * calls_per_step * steps
    shifted = run(MaskedReference(lambda call: masks_for(call, shift=1), n))  # a counter one step ahead
    assert (shifted - out).abs().max() > 1e-3
