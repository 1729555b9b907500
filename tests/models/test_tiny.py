"""Embedded tiny pipelines: offline, deterministic weights, tokenizers built in code."""
import pytest
import torch

from dit_accel.models.tiny import TINY_DEFAULTS, TINY_METHOD_DEFAULTS, TINY_MODELS, build_tiny_pipeline

COMPONENTS = {
    "tiny-wan": ("transformer", "vae", "text_encoder"),
    "tiny-flux": ("transformer", "vae", "text_encoder", "text_encoder_2"),
    "tiny-skyreels-v2": ("transformer", "vae", "text_encoder"),
    "tiny-wan-vace": ("transformer", "vae", "text_encoder"),
    "tiny-sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
    "tiny-chroma": ("transformer", "vae", "text_encoder"),
    "tiny-cogview4": ("transformer", "vae", "text_encoder"),
    "tiny-qwenimage": ("transformer", "vae", "text_encoder"),
    "tiny-flux2": ("transformer", "vae", "text_encoder"),
    "tiny-minimax-h3": ("transformer", "vae", "text_encoder"),
}


def test_every_tiny_pipeline_lists_its_weighted_components():
    assert set(COMPONENTS) == set(TINY_MODELS)


def _weights(pipe, names):
    return {f"{n}.{k}": v.clone() for n in names for k, v in getattr(pipe, n).state_dict().items()}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_same_seed_same_weights_and_rng_untouched(name):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _weights(build_tiny_pipeline(name, seed=0), COMPONENTS[name])
    assert torch.equal(torch.rand(3), expected_next), "building a tiny model must not consume the global RNG"
    b = _weights(build_tiny_pipeline(name, seed=0), COMPONENTS[name])
    c = _weights(build_tiny_pipeline(name, seed=1), COMPONENTS[name])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)


# Sums of every weight of each component, printed as JSON by a fresh interpreter.
_FINGERPRINT = """
import json
from dit_accel.models.tiny import build_tiny_pipeline
components = {components!r}
print(json.dumps({{name: [float(sum(p.detach().double().abs().sum() for p in getattr(pipe, c).parameters()))
                         for c in parts]
                  for name, parts in components.items()
                  for pipe in [build_tiny_pipeline(name, seed=0)]}}))
"""


def _fingerprint_in_fresh_process(hash_seed: str, preamble: str = "") -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": hash_seed}
    code = preamble + _FINGERPRINT.format(components=COMPONENTS)
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_weights_identical_across_processes():
    """Same seed, fresh interpreters (different import order, hash seed): same weights."""
    a = _fingerprint_in_fresh_process("123")
    b = _fingerprint_in_fresh_process("7", preamble="import diffusers, transformers, torch\ntorch.rand(5)\n")
    here = {name: [float(sum(p.detach().double().abs().sum() for p in getattr(pipe, c).parameters()))
                   for c in parts]
            for name, parts in COMPONENTS.items() for pipe in [build_tiny_pipeline(name, seed=0)]}
    assert a == b == here and set(a) == set(COMPONENTS)


@pytest.mark.parametrize("attr", ["tokenizer", "tokenizer_2"])
def test_code_built_tokenizer_handles_any_text(attr):
    pipe = build_tiny_pipeline("tiny-flux")
    tok = getattr(pipe, attr)
    prompts = ["a cat", "ünïcödé 日本語 🐼 tabs\tand\nnewlines", ""]
    enc = tok(prompts, padding="max_length", max_length=16, truncation=True, return_attention_mask=True,
              return_tensors="pt")
    assert enc.input_ids.shape == (3, 16)
    assert enc.attention_mask[0].sum() < 16 and enc.attention_mask[1].sum() == 16  # short padded, long truncated
    assert (enc.input_ids[0][enc.attention_mask[0] == 0] == tok.pad_token_id).all()
    assert tok.eos_token_id in enc.input_ids[0].tolist()
    assert tok.decode(tok("a cat").input_ids, skip_special_tokens=True) == "a cat"
    assert tok.unk_token_id not in tok(prompts[1]).input_ids  # byte level: nothing is unknown
    assert sorted(tok.get_vocab().values()) == list(range(len(tok)))  # contiguous ids


def test_tiny_wan_default_grid_is_big_enough_for_sparsity():
    pipe = build_tiny_pipeline("tiny-wan")
    d = TINY_DEFAULTS["tiny-wan"]
    pt, ph, pw = pipe.transformer.config.patch_size
    t = ((d["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1) // pt
    h = d["height"] // pipe.vae_scale_factor_spatial // ph
    w = d["width"] // pipe.vae_scale_factor_spatial // pw
    assert (t, h, w) == (5, 8, 8)
    assert set(TINY_METHOD_DEFAULTS["tiny-wan"]) == {"tile", "gna", "radial", "sla"}


def test_tiny_flux_generates_an_image_offline():
    pipe = build_tiny_pipeline("tiny-flux")
    out = pipe("a red panda", height=64, width=64, num_inference_steps=1, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


def test_unknown_tiny_name_lists_choices():
    with pytest.raises(ValueError, match="tiny-wan"):
        build_tiny_pipeline("tiny-nope")
