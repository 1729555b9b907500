"""``generate`` outputs and sidecars, ``convert`` folders, and the smaller readers under faults: killed
writers leave an old or a new complete artefact (a sidecar only beside the video it describes), outputs
leave no stale frames of an earlier run, and damaged files are one line naming them."""

import json
import shutil

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel import atomic_files as _io
from dit_accel.cli.main import main
from dit_accel.io import load_video, save_video

from .faults import KINDS, assert_one_line, damage, kill_points, run_killed, write_points

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "tiny-wan", "--frames", "9", "--height", "32", "--width", "64", "--steps", "2", "--quiet"]


def _generate(out, seed):
    assert main(["generate", *TINY, "--seed", str(seed), "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    refs = {}
    for seed in (0, 1):
        _generate(root / f"seed{seed}.mp4", seed)
        refs[seed] = load_video(root / f"seed{seed}.mp4")
    assert not np.array_equal(refs[0], refs[1])
    return root, refs


def test_killed_generate_never_leaves_a_sidecar_beside_another_video(tmp_path, videos):
    root, refs = videos
    total = write_points(lambda: _generate(tmp_path / "count.mp4", 1))
    assert total >= 4
    seen = set()
    for k in kill_points(total, 6):
        case = tmp_path / f"kill{k}"
        case.mkdir()
        out = case / "video.mp4"
        shutil.copy(root / "seed0.mp4", out)
        shutil.copy(root / "seed0.mp4.json", case / "video.mp4.json")
        assert run_killed(lambda: _generate(out, 1), k) == "killed"
        frames = load_video(out)
        seed = next(s for s, ref in refs.items() if np.array_equal(frames, ref))  # old or new, whole
        sidecar = case / "video.mp4.json"
        if sidecar.exists():
            record = json.loads(sidecar.read_text())
            assert record["settings"]["seed"] == seed, k  # the sidecar describes the video beside it
        seen.add((seed, sidecar.exists()))
        assert sorted(p.name for p in case.iterdir() if not _io.is_temp_name(p)) <= ["video.mp4", "video.mp4.json"]
    assert (1, False) in seen  # a kill between the video and its sidecar: no stale sidecar


@pytest.mark.parametrize("first, second", [(5, 3), (1, 3), (3, 1)], ids=["shorter", "one-then-many", "many-then-one"])
@pytest.mark.parametrize("target", ["x.png", "frames"])
def test_output_at_the_same_path_keeps_no_stale_frames(tmp_path, first, second, target):
    g = np.random.default_rng(0)
    path = tmp_path / target
    (tmp_path / "notes.png").write_bytes(b"mine")  # not a frame of this output: kept
    save_video(g.integers(0, 255, (first, 8, 8, 3), dtype=np.uint8), path)
    new = g.integers(0, 255, (second, 8, 8, 3), dtype=np.uint8)
    save_video(new, path)
    np.testing.assert_array_equal(load_video(path), new)
    assert (tmp_path / "notes.png").read_bytes() == b"mine"


def test_generate_with_a_damaged_weights_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "dit_accel_method.json").write_bytes(b'{"method": {"method": "sla", "topk"')
    rc = main(["generate", *TINY, "--weights", str(folder), "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "dit_accel_method.json: is truncated" in err, err


# ----------------------------------------------------------------------------- convert
D = 12  # the tiny Wan transformer: 2 layers, 2 heads of 12


def _checkpoint(path, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(2):
        state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.weight"] = torch.randn(D, D, generator=g)
        state[f"net.blocks.{i}.self_attn.attn_op.local_attn.proj_l.bias"] = torch.randn(D, generator=g)
    state["net.blocks.0.self_attn.q.lora_A.weight"] = torch.randn(4, 2 * D, generator=g) * 0.2
    state["net.blocks.0.self_attn.q.lora_B.weight"] = torch.randn(2 * D, 4, generator=g) * 0.2
    torch.save({"state_dict": state}, path)
    return path


def _loaded(folder):
    from dit_accel.models import tiny as T
    from dit_accel.checkpoints.finetuned import load_into, sla_state_dict

    model = T.build_tiny_transformer("wan")
    handle = dit_accel.apply(model, dit_accel.SLA.reference(topk=0.5), backend="torch")
    load_into(handle, folder)
    return sla_state_dict(handle.sla_projections())


def test_killed_convert_loads_old_new_or_one_line(tmp_path):
    from dit_accel.checkpoints.convert import convert_checkpoint

    method = dit_accel.SLA.reference(topk=0.5)
    ckpts = {s: _checkpoint(tmp_path / f"c{s}.pth", s) for s in (0, 1)}
    refs = {}
    for s in (0, 1):
        convert_checkpoint(ckpts[s], tmp_path / f"ref{s}", method=method)
        refs[s] = _loaded(tmp_path / f"ref{s}")
    total = write_points(lambda: convert_checkpoint(ckpts[1], tmp_path / "count", method=method))
    outcomes = []
    for k in kill_points(total, total):
        out = tmp_path / f"kill{k}"
        shutil.copytree(tmp_path / "ref0", out)
        assert run_killed(lambda: convert_checkpoint(ckpts[1], out, method=method, overwrite=True), k) == "killed"
        try:
            got = _loaded(out)
        except ValueError as err:
            assert_one_line(err, out)
            outcomes.append("refused")
            continue
        outcomes.append(next(s for s, ref in refs.items() if all(torch.equal(got[n], ref[n]) for n in ref)))
    assert outcomes[0] == 0 and outcomes[-1] == 1 and "refused" in outcomes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_damaged_convert_checkpoint_is_one_line(tmp_path, kind, suffix):
    from safetensors.torch import save_file

    from dit_accel.checkpoints.convert import convert_checkpoint

    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        _checkpoint(path, 0)
    else:
        save_file({"net.blocks.0.self_attn.attn_op.local_attn.proj_l.weight": torch.zeros(D, D)}, str(path))
    damage(path, kind)
    with pytest.raises(ValueError) as info:
        convert_checkpoint(path, tmp_path / "out")
    assert_one_line(info.value, path)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- smaller readers
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_strategy_file_is_one_line(tmp_path, kind):
    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({f"0_0_{h}": [1, 1, 1] for h in range(2)}))
    damage(path, kind)
    with pytest.raises(ValueError) as info:
        dit_accel.Tile.from_strategy(path, tile=(1, 2, 2))
    assert_one_line(info.value, path)


@pytest.mark.parametrize("heads", [7, 1])
def test_strategy_with_other_heads_than_the_model_names_the_file(tmp_path, heads):
    from dit_accel.models.tiny import build_tiny_pipeline

    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({f"0_{layer}_{h}": [1, 1, 1] for layer in range(2) for h in range(heads)}))
    pipe = build_tiny_pipeline("tiny-wan")
    with pytest.raises(ValueError, match=f"has windows for {heads} heads per layer, but WanTransformer3DModel's "
                                         "attention layers run 2 heads") as info:  # (at apply, before any call)
        dit_accel.apply(pipe, dit_accel.Tile.from_strategy(path, tile=(1, 2, 2)))
    assert_one_line(info.value, path)


@pytest.mark.parametrize("content", [b"", b"{\"a|b\": {\"choice\"", b"\x00\x01binary", b"[1, 2]",
                                     b'{"k": {"choice": 3}}'], ids=["empty", "truncated", "binary", "list", "entry"])
def test_damaged_autotune_cache_is_a_warning_and_ignored(tmp_path, monkeypatch, content):
    from dit_accel.kernels import autotune

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_LOADED", {})
    (tmp_path / "autotune.json").write_bytes(content)
    shape = autotune.ShapeClass(device_name="cpu", torch="t", triton="tr", dit_accel="d", family="block_sparse",
                                dtype="float32", head_dim=64, density="any")
    with pytest.warns(dit_accel.DitAccelWarning, match="autotune.json") as record:
        assert autotune.cached_choice(shape) is None
        autotune.info()
    assert all("\n" not in str(w.message) for w in record)
    chosen = autotune.choose(shape, {"a": lambda: 0, "b": lambda: 0}, timer=lambda fn, w, r: 1.0)
    assert json.loads((tmp_path / "autotune.json").read_text())[shape.key()]["choice"] == chosen


@pytest.mark.parametrize("kind", KINDS + ("other-pickle",))
def test_damaged_capture_file_is_one_line(tmp_path, kind):
    from dit_accel.eval.fidelity import bench_fidelity

    path = tmp_path / "layer000_step000.pt"
    q = torch.randn(1, 2, 16, 8)
    torch.save({"q": q, "k": q, "v": q, "grid": (1, 4, 4), "layer": 0, "step": 0}, path)
    if kind == "other-pickle":
        torch.save([1, 2, 3], path)
    else:
        damage(path, kind)
    (tmp_path / f"{_io.temp_name(path).name}").write_bytes(b"half")  # a killed capture's temporary: skipped
    with pytest.raises(ValueError) as info:
        bench_fidelity(tmp_path, {"tile": dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))})
    assert_one_line(info.value, path)


def test_atomic_write_keeps_the_old_file_when_killed(tmp_path):
    path = tmp_path / "a.json"
    _io.atomic_write_json(path, {"v": 0})
    for k in (1, 2):
        outcome = run_killed(lambda: _io.atomic_write_json(path, {"v": 1}), k)
        assert outcome == "killed"
        assert _io.read_json(path) == {"v": 0 if k == 1 else 1}
        _io.atomic_write_json(path, {"v": 0})
    leftovers = [p for p in tmp_path.iterdir() if _io.is_temp_name(p)]
    assert len(leftovers) == 1  # the temporary of the kill before the rename; a later writer clears it
    _io.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b'{"a": [1, 2', "is truncated"),
                                              (b"\x00\x9f", "is binary"), (b"\xff\xfeab", "is not UTF-8 text"),
                                              (b"[1]", "holds a JSON list"), (b"{'a': 1}", "is not valid JSON")])
def test_read_json_says_what_is_wrong_and_what_is_expected(tmp_path, content, problem):
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(_io.BadFileError) as info:
        _io.read_json(path, expected="a settings object")
    text = str(info.value)
    assert text.startswith(f"{path}: {problem}") and text.endswith("; expected a settings object") and "\n" not in text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".png"])
def test_damaged_video_is_one_line(tmp_path, kind, suffix):
    path = tmp_path / f"v{suffix}"
    save_video(np.random.default_rng(0).integers(0, 255, (1 if suffix == ".png" else 3, 8, 8, 3), dtype=np.uint8),
               path)
    damage(path, kind)
    with pytest.raises(ValueError) as info:
        load_video(path)
    assert_one_line(info.value, path)


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_model_index_is_one_line(tmp_path, kind):
    from dit_accel.pipelines.presets import resolve_model_family

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"]}))
    damage(folder / "model_index.json", kind)
    with pytest.raises(ValueError) as info:
        resolve_model_family(str(folder))
    assert_one_line(info.value, folder / "model_index.json")
