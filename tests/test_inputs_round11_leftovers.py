"""Round 11, leftovers found by the area rounds outside their own files."""

import pytest
import torch

import dit_accel


def _same_tile_reference(q, k, v, grid, tile):
    """Attention where a token sees exactly the tokens of its own tile (STA with a window of one tile), raster order:
    written here from the definition, not from the package's layouts."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, len(grid))
    tiles = coords // torch.tensor(tile)
    mask = (tiles[:, None, :] == tiles[None, :, :]).all(-1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.double()


def test_a_tile_given_as_one_int_runs_as_that_tile_in_every_dimension():
    """Before: ``Tile(tile=4, window=1)`` (the ComfyUI node's ``tile="4"`` too) was accepted and then failed at its
    first call with a raw "TypeError: 'int' object is not iterable" (``math.prod(self.tile)``)."""
    from dit_accel.eval.fidelity import method_attention

    grid = (8, 8, 8)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    out, density = method_attention(q, k, v, dit_accel.Tile(tile=4, window=1), grid, backend="torch")
    want = _same_tile_reference(q, k, v, grid, (4, 4, 4))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert abs(density - 64 / 512) < 1e-9


def test_taylorseer_without_module_patterns_caches_wans_attention(tmp_path):
    """Before: Diffusers' default patterns (``^blocks.*attn``, whole-name matches) fit no module of Wan, whose
    attention modules are ``blocks.N.attn1`` and ``attn2``: ``--cache taylorseer`` hooked nothing ("skipped 0 of
    N"). Now they run as the same patterns numbered; the reference is those patterns given by hand."""
    import json

    import numpy as np

    from dit_accel.cli.main import main
    from dit_accel.io import load_video

    common = ["generate", "--model", "tiny-wan", "--method", "dense", "--frames", "5", "--height", "32", "--width",
              "32", "--steps", "6", "--quiet"]
    options = "disable_cache_before_step=1,cache_interval=2"
    for name, cache in (("default", options), ("named", f"cache_identifiers=^blocks.*attn\\d*,{options}")):
        assert main([*common, "--out", str(tmp_path / f"{name}.mp4"), "--cache", f"taylorseer:{cache}"]) == 0
    default, named = (json.loads((tmp_path / f"{name}.mp4.json").read_text())["cache"]
                      for name in ("default", "named"))
    assert default["attention_calls_skipped"] == named["attention_calls_skipped"] > 0
    np.testing.assert_array_equal(load_video(tmp_path / "default.mp4"), load_video(tmp_path / "named.mp4"))


@pytest.mark.parametrize("command", [
    ["eval", "--model", "tiny-wan", "--methods", "dense", "--prompt", "a fox", "--frames", "5", "--height", "32",
     "--width", "32", "--steps", "1"],
    ["calibrate", "--model", "tiny-wan", "--prompts", "PROMPTS", "--frames", "5", "--height", "32", "--width", "32",
     "--steps", "2", "--min-psnr", "20"],
    ["finetune", "--model", "tiny-wan", "--method", "tile", "--tile", "1,2,2", "--window", "1,1,1", "--prompts",
     "PROMPTS", "--steps", "1", "--frames", "5", "--height", "32", "--width", "32"],
], ids=["eval", "calibrate", "finetune"])
def test_a_text_length_beyond_the_tokenizer_is_one_line_in_every_command(command, tmp_path, capsys):
    """Before: ``--max-sequence-length 100000`` (tiny-wan's tokenizer takes 512) padded the prompts to 100,000
    tokens and failed in the text encoder with a raw out-of-memory traceback (``generate`` was mended first)."""
    from dit_accel.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n")
    command = [str(prompts) if word == "PROMPTS" else word for word in command]
    out = ["--output" if command[0] == "finetune" else "--out", str(tmp_path / "out")]
    assert main([*command, *out, "--max-sequence-length", "100000"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "--max-sequence-length 100000: the tokenizer of WanPipeline takes at most 512 tokens" in err


def test_merge_attention_of_fp64_parts_keeps_fp64_precision():
    """Before: the merge ran in fp32 whatever its inputs, so an fp64 reference split in two and merged was off by
    about 1e-7 against attention over the union in fp64."""
    from dit_accel.kernels.merge import merge_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    want = torch.softmax(scores, -1) @ v
    parts = []
    for keys in (slice(0, 5), slice(5, 16)):
        s = scores[..., keys]
        parts += [torch.softmax(s, -1) @ v[..., keys, :], torch.logsumexp(s, -1)]
    o, lse = merge_attention(*parts)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(o, want, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-13, rtol=1e-13)
