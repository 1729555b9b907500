"""Context parallelism (Ulysses, Ring, both) against single-process dit_accel: torchrun + gloo on CPU.

The workers (cp_worker.py, and the CLI itself under torchrun) run every method on tiny Wan and FLUX
transformers in 2 and 4 processes, in both call orders (``apply`` then
``enable_parallelism`` and the reverse), and compare with the single-process result
computed in the same process.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.torchrun import torchrun

HERE = Path(__file__).resolve().parent


def _torchrun(nproc: int, script: str, *args, timeout: int = 600) -> None:
    """``script``: a worker beside this file, or ``-m package.module`` as a user would run it."""
    torchrun(nproc, script if script.startswith("-m ") else HERE / script, *args, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cp")
    pairs = ("ulysses2", "ring2", "lineage", "video_c", "av")  # one launch of 2 processes for all of them
    _torchrun(2, "cp_worker.py", *[arg for name in pairs for arg in (name, folder / f"{name}.json")])
    _torchrun(4, "cp_worker.py", "four", folder / "four.json")
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in (*pairs, "four")}


def _cases(result: dict, prefix: str = ""):
    return {k: v for k, v in result.items() if isinstance(v, dict) and "diff" in v and k.startswith(prefix)}


def test_ulysses_is_bit_identical_in_both_call_orders(runs):
    cases = _cases(runs["ulysses2"])
    assert len(cases) == 2 * (6 + 4)  # wan: 6 methods, flux: 4; two call orders
    for key, case in cases.items():
        assert case["diff"] == 0.0 and case["finite"], (key, case)
        assert case["remove_exact"], key  # remove() leaves a plain context-parallel model
        assert (case["sparse_calls"] > 0) == ("dense" not in key), (key, case)


def test_ulysses_on_the_wan_lineage_is_bit_identical(runs):
    """Classes of the Wan lineage whose Diffusers class has a _cp_plan (cp_worker.LINEAGE_CP)."""
    cases = _cases(runs["lineage"])
    assert len(cases) == 1 * 4 * 2  # chronoedit: dense, tile, gna, sla; two call orders
    for key, case in cases.items():
        assert case["diff"] == 0.0 and case["finite"] and case["remove_exact"], (key, case)
        assert (case["sparse_calls"] > 0) == ("dense" not in key), (key, case)


def test_ring_matches_within_fp32_and_stays_finite(runs):
    cases = _cases(runs["ring2"])
    assert len(cases) == 20
    for key, case in cases.items():
        assert case["diff"] < 2e-6 and case["finite"], (key, case)  # gna-causal: a shard without visible keys
        assert case["remove_exact"], key


def test_four_processes_ulysses_and_unified(runs):
    cases = runs["four"]
    assert {k.split("/")[0] for k in cases} == {"ulysses4", "unified"} and len(cases) == 10
    for key, case in cases.items():
        assert case["finite"] and case["diff"] < (1e-12 if key.startswith("ulysses4") else 2e-6), (key, case)


@pytest.mark.parametrize("split", ["ulysses2", "ring2"])
def test_gradients_reach_lora_and_sla_projections_and_match(runs, split):
    for method in ("sla", "tile"):
        grad = runs[split][f"grad/wan/{method}"]
        assert grad["rel"] < 1e-5, (method, grad)
        assert grad["sla_params"] == (4 if method == "sla" else 0)  # weight and bias of 2 projections


@pytest.mark.parametrize("split", ["ulysses2", "ring2"])
def test_capture_saves_every_head_group_with_the_whole_sequence(runs, split):
    assert runs[split]["capture"] == 0.0


def test_uneven_and_straddling_sequences_are_refused(runs):
    for split in ("ulysses2", "ring2"):
        assert "not a multiple of 2" in runs[split]["uneven"]
    assert "do not fill whole 64-token blocks" in runs["ring2"]["straddling"]


def test_generate_cli_under_torchrun_matches_one_process(tmp_path):
    """The README's command as written: no test harness, so the library itself runs context parallelism on
    a machine without an accelerator (gloo, every rank on the CPU)."""
    from dit_accel.cli.main import main
    from dit_accel.io import load_video

    common = ["--model", "tiny-wan", "--method", "tile", "--tile", "1,8,8", "--window", "3,1,1", "--frames", "13",
              "--height", "128", "--width", "128", "--steps", "2", "--quiet", "--device", "cpu"]
    _torchrun(2, "-m dit_accel.cli.generate", "--cp", "ulysses=2", *common, "--out", tmp_path / "cp" / "f.png")
    assert main(["generate", *common, "--out", str(tmp_path / "one" / "f.png")]) == 0
    cp, one = load_video(tmp_path / "cp" / "f.png"), load_video(tmp_path / "one" / "f.png")
    assert cp.shape == one.shape == (13, 128, 128, 3)
    np.testing.assert_array_equal(cp, one)
    sidecar = json.loads((tmp_path / "cp" / "f.png.json").read_text())
    assert sidecar["settings"]["cp"] == {"ulysses": 2, "ring": 1}
    assert {row["rank"] for row in sidecar["density"]["per_layer"]} == {0, 1}


def test_ulysses_on_helios_is_bit_identical_and_its_history_is_refused(runs):
    """models-video-c: Helios (cp_worker.VIDEO_C_CP) without history: Ulysses over 2 ranks reproduces one process;
    a call with the packed history is refused under context parallelism."""
    result = dict(runs["video_c"])
    assert "packs a history ahead of the chunk" in result.pop("helios/history")
    cases = _cases(result)
    assert len(cases) == 3  # dense, gna, sla
    for key, case in cases.items():
        assert case["diff"] == 0.0 and case["finite"] and case["remove_exact"], (key, case)
        assert (case["sparse_calls"] > 0) == ("dense" not in key), (key, case)


# ---- models-video-d (issue 28): audio-video classes with a Diffusers _cp_plan (cp_worker.AV_CP)
def test_ulysses_on_ltx2_and_minimax_h3_matches_one_process(runs):
    """Ulysses over 2 ranks, both call orders: LTX-2's video self-attention is bit-identical to one process (with
    a keyframe of tokens appended after the grid, which the _cp_plan splits with the video: within fp32 rounding);
    MiniMax-H3's packed sequence, which its _cp_plan splits contiguously (Preset.split_whole), matches within
    fp32 rounding (the dense Dense() run differs by as much: Diffusers' own split of its text refiner)."""
    cases = _cases(runs["av"])
    assert len(cases) == 2 * 3 * 2 + 1  # ltx2, minimax_h3: dense, gna, sla; two call orders; LTX-2 appended tokens
    for key, case in cases.items():
        limit = 0.0 if key.split("/")[0] == "ltx2" else 1e-5  # (the appended keyframe: within fp32 rounding)
        assert case["diff"] <= limit and case["finite"] and case["remove_exact"], (key, case)
        assert (case["sparse_calls"] > 0) == ("dense" not in key), (key, case)


def test_ring_refuses_a_contiguously_split_joint_sequence():
    """A ring rank's share of a contiguously split sequence (MiniMax-H3, LTX-2 with appended tokens) mixes dense
    and video tokens: refused before any collective."""
    import torch

    from dit_accel.pipelines.parallel import Split, run_split

    q = torch.zeros(1, 2, 8, 4)
    split = Split(ulysses=1, ring=2, ulysses_rank=0, ring_rank=0, ulysses_group=None, ring_group=None)
    with pytest.raises(ValueError, match="use Ulysses"):
        run_split(None, q, q, q, split=split, num_text=4, text_first=True, key_mask=None, scale=None,
                  backend="torch", whole=True)
