"""`dit-accel eval` on tiny-shapes: paired statistics, the dense-vs-dense floor, provenance, the temporal
check, and `eval --compare` with its refusals."""
import hashlib
import json
import shutil

import pytest

from dit_accel.cli.main import main
from dit_accel.eval.stats import summarize

PROMPTS = ["a blue square moving up", "a red circle moving left"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalstats")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = root / "out"
    argv = ["eval", "--model", "tiny-shapes", "--methods", "dense,tile", "--prompts", str(prompts), "--seeds",
            "0,1,2", "--steps", "1", "--warmup", "0", "--no-lpips", "--quiet", "--floor-backend", "sdpa-math",
            "--out", str(out)]
    assert main(argv) == 0
    return root, out, json.loads((out / "results.json").read_text())


def test_rows_carry_paired_statistics_and_the_floor(run):
    _, out, results = run
    labels = [r["label"] for r in results["rows"]]
    assert labels == ["dense", "dense~seed", "dense~sdpa-math", "tile"]
    dense, seed, math, tile = results["rows"]
    assert seed["floor"] == "seed" and math["floor"] == "backend"
    assert math["backends_used"]["calls"]["sdpa-math"] > 0
    # The paired PSNR is the mean of the per-sample PSNRs, with the t-interval over the 6 pairs.
    psnr = [s["psnr"] for s in tile["samples"]]
    expected = summarize(psnr, [s["prompt"] for s in tile["samples"]])
    assert tile["paired"]["psnr"]["n"] == 6 and tile["paired"]["psnr"]["ci"] == pytest.approx(expected["ci"])
    # Ground truth and time are per-sample differences against dense on the same prompt and seed.
    gt = [float(t["groundtruth_ok"]["all_ok"]) - float(d["groundtruth_ok"]["all_ok"])
          for t, d in zip(tile["samples"], dense["samples"])]
    assert tile["paired"]["groundtruth"]["mean"] == pytest.approx(sum(gt) / 6)
    dt = [t["time_transformer"] - d["time_transformer"] for t, d in zip(tile["samples"], dense["samples"])]
    assert tile["paired"]["time_transformer"]["mean"] == pytest.approx(sum(dt) / 6)
    # The seed floor pairs each prompt's seeds rotated: dense seed 1 against seed 0, and so on.
    assert seed["samples"][0]["psnr"] < 60 and math["samples"][0]["psnr"] > 60
    assert set(tile["verdict"]) >= {"psnr", "groundtruth", "time_transformer"}
    from dit_accel.eval.report import _error_bar  # the Pareto plot's interval around each point

    lo, hi = tile["paired"]["psnr"]["ci"]
    below, above = _error_bar(tile, "psnr", tile["psnr"])
    assert below[0] == pytest.approx(tile["paired"]["psnr"]["mean"] - lo) and above[0] == pytest.approx(
        hi - tile["paired"]["psnr"]["mean"])
    assert (out / "pareto.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Paired statistics against dense" in report and "dense~sdpa-math (floor)" in report
    assert "### Significant differences from dense" in report and "## Temporal check" in report


def test_provenance_and_temporal(run):
    root, _, results = run
    prov = results["provenance"]
    text = (root / "prompts.txt").read_bytes()
    assert prov["prompt_file_sha256"] == hashlib.sha256(text).hexdigest()
    assert prov["prompts_sha256"] == hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()
    assert prov["seeds"] == [0, 1, 2] and prov["device"].startswith("cpu")
    assert set(prov["versions"]) >= {"torch", "triton", "diffusers"} and prov["dit_accel"]
    assert prov["git"] is None or len(prov["git"]["commit"]) == 40
    assert prov["run"][0]["method"] == "tile"
    tile = results["rows"][-1]
    assert tile["backends_used"]["sparse_calls"] > 0 and tile["backends_used"]["sparse_backends"]
    temporal = tile["temporal"]
    assert 0 <= temporal["frozen"] <= 1 and temporal["motion"] > 0
    assert results["rows"][0]["temporal"]["motion_ratio"] == pytest.approx(1.0)  # dense against itself


def test_compare_pairs_folders_and_refuses_mismatches(run, capsys):
    root, out, results = run
    capsys.readouterr()
    assert main(["eval", "--compare", str(out), str(out)]) == 2  # one folder twice: refused, not a table of zeros
    assert "both name the same folder" in capsys.readouterr().err
    twin = root / "same_results"
    shutil.copytree(out, twin)
    assert main(["eval", "--compare", str(out), str(twin)]) == 0
    printed = capsys.readouterr().out
    assert "| tile | psnr |" in printed and "+0 | [0, 0]" in printed
    for name, change, message in [
            ("seeds", lambda r: r["settings"].update(seeds=[0, 1, 3]), "the seeds differ ([0, 1, 2] vs [0, 1, 3])"),
            ("prompts", lambda r: r["provenance"].update(prompts_sha256="0" * 64), "the prompts differ")]:
        other = root / f"other_{name}"
        other.mkdir()
        changed = json.loads(json.dumps(results))
        change(changed)
        (other / "results.json").write_text(json.dumps(changed))
        assert main(["eval", "--compare", str(out), str(other)]) == 2
        printed = capsys.readouterr().err.strip()
        assert len(printed.splitlines()) == 1 and message in printed and "refusing" in printed
    assert main(["eval", "--compare", str(out), str(root / "missing")]) == 2
    assert "no results.json there" in capsys.readouterr().err
    assert main(["eval", "--out", str(root / "x")]) == 2
    assert "--model is required" in capsys.readouterr().err
