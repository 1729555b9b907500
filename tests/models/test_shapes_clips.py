"""docs/scripts/shapes_clips.py (BENCHMARKS.md section 8.3): the caption folder it writes is what
`finetune --data` reads, each clip the rendered object of its prompt."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

_SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "scripts" / "shapes_clips.py"


def test_the_caption_folder_holds_each_prompts_clip(tmp_path):
    from dit_accel.models.clips import COLOURS, DIRECTIONS, SHAPES, make_prompt, render_batch
    from dit_accel.training.data import CaptionDataset

    spec = importlib.util.spec_from_file_location("shapes_clips", _SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.write_clips(tmp_path, count=3, frames=7, seed=5)
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(len(t), (3,), generator=g) for t in (COLOURS, SHAPES, DIRECTIONS)]
    want = render_batch(*ids, generator=g, frames=7, height=48, width=48)
    names = [list(COLOURS), list(SHAPES), list(DIRECTIONS)]
    data = CaptionDataset(tmp_path, frames=7, height=48, width=48)
    for i, row in enumerate(rows):
        assert row["text"] == make_prompt(*(t[int(x[i])] for t, x in zip(names, ids)))
        pixels, caption = data.item(i)  # [3, F, H, W] in [-1, 1]
        assert caption == row["text"] and tuple(pixels.shape) == (3, 7, 48, 48)
        got = (pixels.permute(1, 2, 3, 0).numpy() + 1) / 2
        assert np.abs(got - want[i].numpy()).max() < 0.02  # GIF: one palette entry per colour drawn


def test_a_rerun_replaces_the_caption_list_only_at_the_end(tmp_path, monkeypatch):
    """A run stopped half-way must not leave an earlier metadata.jsonl beside new clips (read as a good folder)."""
    import pytest

    from dit_accel import videos

    spec = importlib.util.spec_from_file_location("shapes_clips", _SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.write_clips(tmp_path, count=2, frames=3, seed=1)
    calls = []

    def stop_at_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    save = videos.save_video
    monkeypatch.setattr(videos, "save_video", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        script.write_clips(tmp_path, count=2, frames=3, seed=2)
    assert not (tmp_path / "metadata.jsonl").exists()
