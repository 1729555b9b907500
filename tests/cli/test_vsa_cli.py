"""`dit-accel generate --model <FastWan-like folder> --method vsa`: the checkpoint's gates load and run."""

import json
from pathlib import Path

import pytest
import torch

from dit_accel.cli.main import main


@pytest.fixture(scope="module")
def gated_wan_folder(tmp_path_factory):
    """tiny-wan saved as a Diffusers folder, with to_gate_compress gates in its transformer checkpoint (FastWan's
    key layout), which Diffusers drops when it loads the pipeline."""
    from safetensors.torch import load_file, save_file

    from dit_accel.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("models") / "fastwan"
    build_tiny_pipeline("tiny-wan").save_pretrained(folder)
    path = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(str(path))
    dim = state["blocks.0.attn1.to_q.weight"].shape[0]
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        state[f"blocks.{i}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=g) * 0.1
        state[f"blocks.{i}.to_gate_compress.bias"] = torch.randn(dim, generator=g) * 0.1
    save_file(state, str(path), metadata={"format": "pt"})
    return folder


def test_generate_method_vsa_loads_the_gates(gated_wan_folder, tmp_path, capsys):
    out = tmp_path / "fastwan.mp4"
    argv = ["generate", "--model", str(gated_wan_folder), "--method", "vsa", "--frames", "9", "--height", "128",
            "--width", "128", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads(Path(str(out) + ".json").read_text())
    # what ran: the default sparsity, not "None" (issue 74, item 7)
    assert meta["method"] == {"method": "vsa", "topk": None, "sparsity": 0.8, "tile": [4, 4, 4]}
    assert "method vsa (topk=None, sparsity=0.8, tile=(4, 4, 4))" in capsys.readouterr().out
    assert any("gates loaded for 2 of 2 attention layers" in w for w in meta["warnings"])
    # grid (3, 8, 8): 4 cubes, ceil(0.2 * 4) = 1 kept per query cube
    assert meta["density"]["mean"] == pytest.approx(0.25)
    out2 = tmp_path / "topk.mp4"
    assert main(argv[:-1] + [str(out2), "--vsa-topk", "2", "--tile", "1,8,8"]) == 0
    meta = json.loads(Path(str(out2) + ".json").read_text())
    assert meta["method"] == {"method": "vsa", "topk": 2, "sparsity": None, "tile": [1, 8, 8]}
    assert meta["density"]["mean"] == pytest.approx(2 / 3)


def test_eval_has_a_vsa_row(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny-wan", "--methods", "vsa", "--prompt", "a cat", "--frames", "9",
                 "--height", "128", "--width", "128", "--steps", "1", "--max-sequence-length", "16", "--warmup", "0",
                 "--out", str(out), "--device", "cpu", "--no-lpips"]) == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| vsa |"))
    assert "0.250" in row  # grid (3, 8, 8): 1 of 4 cubes per query cube at the default sparsity 0.8


def test_generate_and_finetune_vsa_with_a_tile_larger_than_the_grid(tmp_path, capsys):
    """Issue 74, item 1: ``--tile 100,100,100`` tried to allocate 1 TB (a raw RuntimeError). The tile is clamped to
    the (3, 8, 8) grid per dimension: one cube, so VSA visits every block."""
    from dit_accel.cli.finetune import main as finetune_main

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\na blue square\n")
    out = tmp_path / "big-tile.mp4"
    assert main(["generate", "--model", "tiny-wan", "--method", "vsa", "--tile", "100,100,100", "--frames", "9",
                 "--height", "128", "--width", "128", "--steps", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["method"]["tile"] == [100, 100, 100] and meta["density"]["mean"] == pytest.approx(1.0)
    rc = finetune_main(["--model", "tiny-wan", "--method", "vsa", "--tile", "100,100,100", "--prompts",
                        str(prompts_file), "--output", str(tmp_path / "ft"), "--steps", "1", "--frames", "9",
                        "--height", "128", "--width", "128", "--max-sequence-length", "16", "--eval-batches", "0",
                        "--gradient-accumulation-steps", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err


def test_generate_refuses_nan_frames_and_keeps_the_earlier_output(tmp_path, capsys):
    """Issue 74, item 8: NaN frames were painted black and generate exited 0 with an all-black video. A model
    whose output is NaN (here a NaN in its output projection) now ends with one line and exit 1, and the video
    and sidecar of an earlier run stay as they were."""
    from safetensors.torch import load_file, save_file

    from dit_accel.models.tiny import build_tiny_pipeline

    folder = tmp_path / "broken"
    build_tiny_pipeline("tiny-wan").save_pretrained(folder)
    path = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(str(path))
    state["proj_out.bias"][0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    out = tmp_path / "video.mp4"
    out.write_bytes(b"earlier video")
    Path(str(out) + ".json").write_text("{\"earlier\": true}")
    rc = main(["generate", "--model", str(folder), "--method", "vsa", "--frames", "9", "--height", "128", "--width",
               "128", "--steps", "1", "--no-compare-dense", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]  # (after the loading progress bars)
    assert last.startswith("dit-accel: error: the frames hold") and "non-finite values (NaN or inf)" in last
    assert "nothing was saved" in last
    assert out.read_bytes() == b"earlier video" and Path(str(out) + ".json").read_text() == "{\"earlier\": true}"
