"""FID's reference side (``dit_accel.eval.fid.FidReference``, ``FrameFolder``): ``--real`` is read a batch at a time,
not held in memory whole, and each reference set (``--real``, the dense row) goes through the feature network once
per eval run, not once per row; the distances are those of a fresh computation."""
import pytest
import torch
from torch import nn

from dit_accel.eval.fid import FidReference, FrameFolder, frechet_distance
from tests.eval.offline_models import TinyFeatures
from tests.eval.test_metrics import _reference_fid

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore:Matrix is singular")]


def _frames(n, seed, h=32, w=32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _solid_folder(folder, n, size=(32, 32)):
    """``n`` solid-colour PNGs (two in a subfolder), and their frames as the folder reader must give them."""
    from PIL import Image

    (folder / "sub").mkdir(parents=True)
    frames = []
    for i in range(n):
        colour = (40 + 50 * i % 200, 10 * i % 250, 200 - 30 * i % 180)
        where = folder / "sub" if i < 2 else folder
        Image.new("RGB", size[::-1], colour).save(where / f"{i:03d}.png")
        frames.append(torch.tensor(colour, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, *size))
    order = sorted(range(n), key=lambda i: str((folder / "sub" if i < 2 else folder) / f"{i:03d}.png"))
    return torch.stack([frames[i] for i in order])


class _Counting(nn.Module):
    """TinyFeatures that counts the solid-colour images (the --real set here) it is given."""

    def __init__(self):
        super().__init__()
        self.inner, self.solid, self.num_features = TinyFeatures().eval(), 0, 32

    def forward(self, x):
        flat = x.flatten(2)  # [n, 3, pixels]
        self.solid += int(((flat.amax(2) - flat.amin(2)) == 0).all(1).sum())
        return self.inner(x)


def test_one_reference_gives_each_set_its_own_fresh_distance():
    net, real = TinyFeatures().eval(), _frames(12, 0)
    reference = FidReference(real, net, batch_size=5)
    first, second = _frames(10, 1), (_frames(10, 2) * 0.5)
    got = [reference.distance(first), reference.distance(second), reference.distance(first)]
    assert got[0] == pytest.approx(_reference_fid(first, real, net), rel=1e-3)
    assert got[1] == pytest.approx(_reference_fid(second, real, net), rel=1e-3)
    assert got[2] == pytest.approx(got[0], rel=1e-6)  # the previous set left nothing behind
    with pytest.raises(ValueError, match="at least 2 images per set; got 1 and 12"):
        reference.distance(_frames(1, 3))


def test_a_folder_is_read_in_batches_and_scores_as_its_frames(tmp_path, monkeypatch):
    real = _solid_folder(tmp_path / "real", 7)
    folder = FrameFolder(str(tmp_path / "real"), (32, 32))
    assert len(folder) == 7
    sizes = [b.shape[0] for b in folder.batches(3)]
    assert sizes == [3, 3, 1]  # never the whole set at once
    torch.testing.assert_close(torch.cat(list(folder.batches(3))), real, atol=1 / 255, rtol=0)
    net, fake = TinyFeatures().eval(), _frames(9, 4)
    assert frechet_distance(fake, folder, net, batch_size=3) == pytest.approx(frechet_distance(fake, real, net),
                                                                               rel=1e-4)
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg/.webp images"):
        FrameFolder(str(tmp_path / "real" / "sub" / "none"), (8, 8))


def test_eval_runs_the_real_set_through_the_network_once_for_all_rows(tmp_path):
    from dit_accel.eval.runner import EvalSettings, MethodSpec, run_eval

    _solid_folder(tmp_path / "real", 4)
    feature = _Counting()
    settings = EvalSettings(model="tiny-wan", prompts=["a cat"], seeds=[0], frames=5, height=32, width=32,
                            steps=1, max_sequence_length=16, warmup=0)
    results = run_eval(settings, [MethodSpec.parse("tile"), MethodSpec.parse("radial")], tmp_path / "out",
                       fid_feature=feature, real_dir=str(tmp_path / "real"), lpips=False, floor_backend="none")
    rows = [r for r in results["rows"] if r.get("fid_real") is not None]
    assert [r["label"] for r in rows] == ["dense", "dense~seed", "tile", "radial"]
    assert feature.solid == 4  # once; each row ran them through again before
    by_label = {r["label"]: r["fid_real"] for r in rows}
    # tile and radial cover this tiny grid whole (the dense frames, PSNR 100): the dense distance again, however many
    # sets the kept reference was compared with before; the other seed's frames are another distance
    assert by_label["tile"] == pytest.approx(by_label["dense"], rel=1e-6)
    assert by_label["radial"] == pytest.approx(by_label["dense"], rel=1e-6)
    assert by_label["dense~seed"] != pytest.approx(by_label["dense"], rel=1e-3)
