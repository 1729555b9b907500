"""Sparse attention stacked with Diffusers' step caches (dit_accel.pipelines.caches), in both orders of
enabling, on a tiny video model (Wan) and a tiny image model (Flux); the refused pairs and their reasons;
the step schedule under a cache that skips transformer work."""
import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.pipelines.caches import CacheSpec, enable_cache, parse_stack

STEPS = 3
CACHES = {  # settings under which each cache skips work within 3 steps
    "fbcache": "fbcache:threshold=0.9",
    "taylorseer": "taylorseer:cache_interval=2;disable_cache_before_step=1",
    "pab": "pab:spatial_attention_block_skip_range=2;spatial_attention_timestep_skip_range=0/1000",
    "magcache": "magcache:mag_ratios=flux;threshold=0.9;retention_ratio=0.0",
}
MODELS = {
    "wan": ("tiny-wan", dict(num_frames=5, height=64, width=64)),
    "flux": ("tiny-flux", dict(height=64, width=64)),
}
METHODS = {
    "wan": {"tile": dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), "sla": dit_accel.SLA(topk=0.5),
            "gna": dit_accel.GNA(kernel_size=(2, 3, 3))},
    "flux": {"tile": dit_accel.Tile(tile=(2, 2), window=(1, 1)), "sla": dit_accel.SLA(topk=0.5),
             "gna": dit_accel.GNA(kernel_size=(3, 3))},
}
# Every cache with every method on the image model; on the video model every cache with Tile and every
# method with FirstBlockCache (the suite's time budget).
PAIRS = [("flux", m, c) for m in METHODS["flux"] for c in CACHES] + \
        [("wan", "tile", c) for c in CACHES] + [("wan", m, "fbcache") for m in ("sla", "gna")]


@pytest.fixture(scope="module")
def pipes():
    out = {}
    for key, (name, _) in MODELS.items():
        pipe = build_tiny_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        out[key] = pipe
    return out


def _run(pipe, key):
    kwargs = MODELS[key][1]
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np", num_inference_steps=STEPS,
               max_sequence_length=16, **kwargs)
    frames = getattr(out, "frames", None)
    return np.asarray(frames if frames is not None else out.images, dtype=np.float32)


def _calls(handle):
    s = handle.summary()
    return s["sparse_calls"] + s["dense_calls"]


@pytest.fixture(scope="module")
def alone(pipes):
    """Each method without a cache: its output and attention calls."""
    out = {}
    for key, methods in METHODS.items():
        for name, method in methods.items():
            with dit_accel.apply(pipes[key], method) as handle:
                out[key, name] = _run(pipes[key], key), _calls(handle)
    return out


@pytest.mark.parametrize("key, method, cache", PAIRS, ids=[f"{k}-{m}+{c}" for k, m, c in PAIRS])
def test_stack_in_both_orders(pipes, alone, key, method, cache):
    pipe, spec = pipes[key], CacheSpec.parse(CACHES[cache])
    with dit_accel.apply(pipe, METHODS[key][method]) as handle, enable_cache(pipe, spec, STEPS):
        first_apply = _run(pipe, key)
        calls = _calls(handle)
    with enable_cache(pipe, spec, STEPS), dit_accel.apply(pipe, METHODS[key][method]) as handle:
        first_cache = _run(pipe, key)
        calls_b = _calls(handle)
    np.testing.assert_allclose(first_apply, first_cache, atol=1e-6)  # the order of enabling does not matter
    assert calls == calls_b
    base, base_calls = alone[key, method]
    assert calls < base_calls, "the cache skipped no attention call"  # it engaged on the sparse model
    assert not np.array_equal(first_apply, base)  # and changed the output (cached or predicted values)
    assert not pipe.transformer.is_cache_enabled  # both taken off again


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("cache", list(CACHES))
def test_dense_stack_equals_the_cache_on_the_unpatched_model(pipes, key, cache):
    """Dense through dit_accel with a cache is the same computation as the cache alone (reference)."""
    pipe, spec = pipes[key], CacheSpec.parse(CACHES[cache])
    with enable_cache(pipe, spec, STEPS):
        reference = _run(pipe, key)
    with enable_cache(pipe, spec, STEPS), dit_accel.apply(pipe, dit_accel.Dense()):
        stacked = _run(pipe, key)
    np.testing.assert_allclose(stacked, reference, atol=1e-6)


def test_step_schedule_follows_the_scheduler_under_a_cache(pipes):
    """With FirstBlockCache skipping blocks and classifier-free guidance (two transformer calls per step),
    every attention call sees the scheduler's step 0..STEPS-1, and dense_steps=1 makes exactly step 0 dense."""
    pipe = pipes["wan"]
    seen = []

    class Observer:
        def wants(self, layer, step):
            seen.append((layer, step))
            return False

        def save(self, *args, **kwargs):
            pass

    with enable_cache(pipe, CacheSpec.parse(CACHES["fbcache"]), STEPS), \
            dit_accel.apply(pipe, METHODS["wan"]["tile"], dense_steps=1, capture=Observer()) as handle:
        _run(pipe, "wan")
        summary = handle.summary()
    steps = sorted({step for _, step in seen})
    assert steps == list(range(STEPS))  # not 0 .. 2 * STEPS - 1 (the count of transformer calls)
    layer0 = [step for layer, step in seen if layer == 0]
    assert sorted(set(layer0)) == list(range(STEPS))  # the first block runs at every step
    dense_step_calls = sum(1 for _, step in seen if step == 0)
    assert summary["dense_calls"] == dense_step_calls and summary["sparse_calls"] == len(seen) - dense_step_calls


def test_refused_caches_say_why(pipes):
    with pytest.raises(ValueError, match="fastercache: refused: .*call the transformer once per branch"):
        with enable_cache(pipes["flux"], CacheSpec.parse("fastercache"), STEPS):
            pass
    with pytest.raises(ValueError, match="MagCache needs the model's magnitude ratios"):
        with enable_cache(pipes["flux"], CacheSpec.parse("magcache"), STEPS):
            pass
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="cache-dit is not installed; `pip install cache-dit`"):
            with enable_cache(pipes["flux"], CacheSpec.parse("dbcache"), STEPS):
                pass
    assert not pipes["flux"].transformer.is_cache_enabled  # a refusal leaves the model as it was


def test_cache_spec_parsing():
    spec = CacheSpec.parse("fbcache:threshold=0.1")
    assert spec.name == "fbcache" and spec.options == {"threshold": 0.1} and spec.label == "fbcache:threshold=0.1"
    assert CacheSpec.parse("FirstBlockCache").name == "fbcache"
    pab = CacheSpec.parse("pab:spatial_attention_timestep_skip_range=100/800;spatial_attention_block_skip_range=2")
    assert pab.options == {"spatial_attention_timestep_skip_range": (100, 800), "spatial_attention_block_skip_range": 2}
    with pytest.raises(ValueError, match="unknown cache 'teacache'; valid caches: fbcache, taylorseer"):
        CacheSpec.parse("teacache")
    with pytest.raises(ValueError, match="has no option 'treshold'; valid options: threshold"):
        CacheSpec.parse("fbcache:treshold=0.1")
    with pytest.raises(ValueError, match="is not key=value"):
        CacheSpec.parse("fbcache:0.1")
    assert parse_stack("sla+fbcache:threshold=0.2")[0] == "sla"
    assert parse_stack("fbcache") == ("dense", CacheSpec("fbcache"))
    assert parse_stack("tile") == ("tile", None)
    with pytest.raises(ValueError, match="a stack is METHOD, METHOD\\+CACHE or CACHE"):
        parse_stack("a+b+c")


def test_generate_cache_flag_records_the_stack(tmp_path, capsys):
    from dit_accel.cli.main import main

    out = tmp_path / "img.png"
    assert main(["generate", "--model", "tiny-flux", "--method", "tile", "--tile", "2,2", "--window", "1,1",
                 "--cache", CACHES["fbcache"], "--steps", str(STEPS), "--height", "64", "--width", "64",
                 "--out", str(out), "--quiet"]) == 0
    import json

    record = json.loads((tmp_path / "img.png.json").read_text())
    prov = record["provenance"]
    assert prov["run"]["cache"] == {"cache": "fbcache", "threshold": 0.9}
    assert prov["run"]["method"]["method"] == "tile" and prov["seeds"] == [0]
    # FirstBlockCache skipped the second block at some steps: fewer attention calls than 2 layers x steps.
    backends = prov["backends"]
    assert 0 < backends["sparse_calls"] + backends["dense_calls"] < 2 * STEPS
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-flux", "--cache", "fbcache:treshold=1", "--out", str(out)]) == 2
    assert "has no option 'treshold'" in capsys.readouterr().err


def test_eval_stacks_and_cache_mistakes_are_one_line(tmp_path, capsys):
    from dit_accel.cli.main import main

    for flag, value, message in [("--stacks", "tile+teacache", "unknown cache 'teacache'"),
                                 ("--stacks", "tilee+fbcache", "unknown method 'tilee'"),
                                 ("--cache", "pab:foo=1", "PyramidAttentionBroadcastConfig has no option 'foo'")]:
        assert main(["eval", "--model", "tiny-shapes", flag, value, "--out", str(tmp_path / "o")]) == 2
        printed = capsys.readouterr().err.strip()
        assert len(printed.splitlines()) == 1 and message in printed


def _masked_sdpa(mask):
    """F.scaled_dot_product_attention with ``mask`` added to the video self-attention calls (N x N)."""
    import contextlib

    import torch.nn.functional as F

    @contextlib.contextmanager
    def scope():
        original = F.scaled_dot_product_attention

        def masked(query, key, value, attn_mask=None, **kwargs):
            n = mask.shape[0]
            if attn_mask is None and query.shape[-2] == key.shape[-2] == n:
                attn_mask = mask
            return original(query, key, value, attn_mask=attn_mask, **kwargs)

        F.scaled_dot_product_attention = masked
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original
    return scope()


REFERENCE_PAIRS = [("tile", c) for c in CACHES] + [("gna", "fbcache")]


@pytest.mark.parametrize("method, cache", REFERENCE_PAIRS, ids=[f"wan-{m}+{c}" for m, c in REFERENCE_PAIRS])
def test_stack_matches_the_cache_on_dense_attention_with_the_method_mask(pipes, method, cache):
    """The reference: the same cache on the unpatched tiny Wan whose video self-attention is dense SDPA with
    the method's token mask (written from the pattern's mask, not through dit_accel's plans)."""
    from dit_accel.patterns.gna import gna_mask
    from dit_accel.patterns.tile import tile_mask

    grid = (2, 4, 4)  # tiny Wan at 5 frames, 64x64: 2 latent frames, 4x4 patches
    mask = tile_mask(grid, (1, 2, 2), (1, 1, 1)) if method == "tile" else gna_mask(grid, (2, 3, 3))
    assert not mask.all()  # the pattern masks something on this grid
    pipe, spec = pipes["wan"], CacheSpec.parse(CACHES[cache])
    with enable_cache(pipe, spec, STEPS), _masked_sdpa(mask):
        reference = _run(pipe, "wan")
    with dit_accel.apply(pipe, METHODS["wan"][method]), enable_cache(pipe, spec, STEPS):
        stacked = _run(pipe, "wan")
    np.testing.assert_allclose(stacked, reference, atol=2e-4)
