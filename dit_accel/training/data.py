"""Training inputs: prompt files (distill mode) and caption folders (data mode).

Data folders use the usual Diffusers training layout::

    data/
      metadata.jsonl      one JSON object per line: {"file_name": "clip1.mp4", "text": "a cat ..."}
      clip1.mp4
      photo.png

Images become 1-frame videos (an animated PNG or WebP is refused: convert it to a video). Videos are cut to the
first ``frames`` frames (the last frame is repeated when a clip is shorter, with a warning naming the clip). Every
sample is resized so that it covers ``(height, width)`` and centre-cropped. The sample order is a pure function of
``(seed, epoch)`` so that resumed runs see the same data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .._util import WarningLog
from ..atomic_files import BadFileError, read_text

__all__ = ["read_prompts", "inputs_digest", "CaptionDataset", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "sample_indices",
           "step_generator", "check_batchable", "check_held_out"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")


def read_prompts(path) -> List[str]:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped)."""
    if path is None:
        raise ValueError("--prompts is required in distill mode: a text file with one prompt per line.")
    if not isinstance(path, (str, Path)):  # (a list of prompts failed in Path() with a bare TypeError)
        raise ValueError(f"--prompts {path!r} is invalid: give the path of a text file with one prompt per line "
                         "(write a list of prompts to such a file first).")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {str(p)!r} does not exist or is not a file; pass a text file with one prompt per line.")
    text = read_text(p, what="--prompts: a UTF-8 text file with one prompt per line")
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise BadFileError(p, "holds no prompts (only blank lines or # comments)" if text.strip() else "is empty",
                           "--prompts: one prompt per line")
    return prompts


def inputs_digest(prompts=None, data=None) -> str:
    """sha256 of the training inputs' contents: the prompts file, or the caption folder's metadata.jsonl and
    every file it names (a resumed run must see the inputs the interrupted one saw)."""
    import hashlib

    from ..atomic_files import sha256_file

    h = hashlib.sha256()
    if data is not None:
        root = Path(data)
        h.update(b"data:" + sha256_file(root / "metadata.jsonl").encode())
        names = {p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS}
        # and the files metadata.jsonl names in subfolders ("clips/a.mp4"): a resumed run must see those unchanged too
        names |= {n for n in _named_files(root) if (root / n).is_file()}
        for name in sorted(names):
            h.update(f"{name}:{sha256_file(root / name)}".encode())
    elif prompts is not None:
        h.update(b"prompts:" + sha256_file(prompts).encode())
    return h.hexdigest()


def _named_files(root: Path) -> List[str]:
    """The ``file_name`` of every readable line of ``root/metadata.jsonl`` (:class:`CaptionDataset` checks them)."""
    names = []
    for line in read_text(root / "metadata.jsonl", what="metadata.jsonl").splitlines():
        try:
            name = json.loads(line)["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if isinstance(name, str) and name.strip():
            names.append(os.path.normpath(name))
    return names


def _load_frames(path: Path, limit: int) -> np.ndarray:
    """File -> uint8 array [F, H, W, 3], at most ``limit`` frames of a video."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        from PIL import Image, ImageOps

        from ..videos import pil_rgb

        with Image.open(path) as im:
            _refuse_animated(path, im)
            # Upright as viewers show it (before: a phone photo stored sideways with an EXIF Orientation tag trained
            # sideways, without a word)
            im = ImageOps.exif_transpose(im)
            return pil_rgb(im)[None]  # (16-bit greyscale scaled: convert("RGB") clipped it, nearly all white)
    from ..videos import load_video

    # only the frames a sample takes (before: every frame of the clip was decoded each time a step drew it, gigabytes
    # for a minute of HD video, where the run keeps the first --frames)
    return np.asarray(load_video(str(path), max_frames=limit))


class AnimatedImageError(BadFileError):
    """An image input (.png, .webp) holding an animation: image data is one frame."""


def _refuse_animated(path: Path, im) -> None:
    """AnimatedImageError for an animated PNG or WebP named as an image: its frames would all be dropped but the
    first (before: without a word). A ``.gif`` is read as a video (:data:`VIDEO_EXTENSIONS`)."""
    count = getattr(im, "n_frames", 1)
    if isinstance(count, int) and count > 1:
        raise AnimatedImageError(path, f"is animated ({count} frames), but an image input is one frame",
                                 f"a still image: to train on its frames, convert it to a video (`ffmpeg -i "
                                 f"{path.name} {path.stem}.mp4`) and name that in metadata.jsonl; for one frame, "
                                 "save that frame as a still image")


def _resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, H, W] float -> [F, 3, height, width]: cover then centre-crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        frames = torch.nn.functional.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[..., top:top + height, left:left + width]


class CaptionDataset:
    """Captioned images/videos from a folder with ``metadata.jsonl``; validated on construction.

    Args:
        root: the folder.
        frames, height, width: the pixel shape every sample is brought to
            (images always give 1 frame).
        flag: the option that named the folder, for the messages (``--data`` or ``--eval-data``).

    Raises ValueError (naming the folder and what to fix) when the folder is
    missing or empty, ``metadata.jsonl`` is missing or malformed, a listed file
    does not exist, media files have no caption, or a caption is empty.
    ``item(i)`` returns ``(pixels [3, F, H, W] in [-1, 1], caption)``.
    """

    def __init__(self, root, *, frames: int, height: int, width: int, flag: str = "--data"):
        if root is None:
            raise ValueError("--data is required in data mode: a folder with metadata.jsonl and images/videos.")
        self.root, self.flag = Path(root), flag
        self.held_out: Optional["CaptionDataset"] = None  # the run's --eval-data clips, set beside its --data
        if not self.root.is_dir():
            raise ValueError(f"{flag} {str(self.root)!r} does not exist or is not a folder.")
        media = sorted(p.name for p in self.root.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        meta = self.root / "metadata.jsonl"
        # (before: a folder whose clips all sit in subfolders, named by metadata.jsonl as "clips/a.mp4", was refused
        # as holding no images or videos)
        no_media = (f"{flag} {str(self.root)!r} holds no images or videos "
                    f"({', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)}), nor a metadata.jsonl that names any.")
        if not media and not meta.is_file():
            raise ValueError(no_media)
        if not meta.is_file():
            raise ValueError(
                f"{flag} {str(self.root)!r} has no metadata.jsonl; write one line per file: "
                '{"file_name": "clip.mp4", "text": "its caption"}.'
            )
        captions, lines = {}, {}
        text = read_text(meta, what='metadata.jsonl: UTF-8 text, one {"file_name": ..., "text": ...} per line')
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text'.") from None
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{meta}:{n}: 'file_name' {name!r} is invalid: the file's name in the folder, "
                                 "e.g. \"clip.mp4\".")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{meta}:{n}: the caption ('text') of {name!r} is empty.")
            rel = os.path.normpath(name)  # ("./a.mp4" is "a.mp4": one file, one caption)
            if os.path.isabs(name) or rel == os.pardir or rel.startswith(os.pardir + os.sep):
                raise ValueError(f"{meta}:{n}: file {name!r} is outside {str(self.root)!r}: name a file inside the "
                                 f"{flag} folder, by its path relative to it (the folder is the dataset).")
            name = rel
            if not (self.root / name).is_file():
                raise ValueError(f"{meta}:{n}: file {name!r} does not exist in {str(self.root)!r}.")
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:  # (found when a step drew it)
                raise ValueError(f"{meta}:{n}: {name!r} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a "
                                 f"video ({', '.join(VIDEO_EXTENSIONS)}); list only those in metadata.jsonl.")
            if name in captions:  # (the later line replaced the earlier caption without a word)
                raise ValueError(f"{meta}:{n}: {name!r} has a caption already (line {lines[name]}); give each file "
                                 "one line.")
            captions[name], lines[name] = text.strip(), n
        if not captions and not media:
            raise ValueError(no_media)
        missing = [m for m in media if m not in captions]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{flag} {str(self.root)!r}: no caption in metadata.jsonl for {shown}.")
        _check_readable(self.root, sorted(captions), flag)
        _check_decodable(self.root, sorted(captions), flag, frames)
        self.files: List[str] = sorted(captions)
        self.captions = [captions[f] for f in self.files]
        self.frames, self.height, self.width = frames, height, width
        self.warnings = WarningLog()  # (once per short clip, not at every step that draws it)

    def __len__(self) -> int:
        return len(self.files)

    def num_frames(self, i: int) -> int:
        return 1 if Path(self.files[i]).suffix.lower() in IMAGE_EXTENSIONS else self.frames

    def item(self, i: int):
        path = self.root / self.files[i]
        expected = f"an image ({', '.join(IMAGE_EXTENSIONS)}) or a video ({', '.join(VIDEO_EXTENSIONS)})"
        try:
            frames = _load_frames(path, self.num_frames(i))
        except Exception as err:  # PIL, imageio and ffmpeg raise many types for damaged files
            raise BadFileError(path, _decode_problem(err), expected) from None
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise BadFileError(path, "holds no frames", expected)
        want = self.num_frames(i)
        frames = frames[:want]
        if frames.shape[0] < want:  # short clip: hold the last frame
            # (before: without a word, so a folder of 33-frame clips under the default 81 frames trained on clips
            # whose last 48 frames stand still)
            self.warnings.warn(f"dit_accel: {self.flag} {self.files[i]} has {frames.shape[0]} frame(s), fewer than "
                               f"--frames {want}: its last frame is repeated {want - frames.shape[0]} times, a still "
                               "tail the run trains on. Lower --frames to the clips' length, or leave out the short "
                               "clips.", key=self.files[i])
            frames = np.concatenate([frames, np.repeat(frames[-1:], want - frames.shape[0], axis=0)])
        x = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = _resize_crop(x, self.height, self.width).clamp(-1, 1)
        return x.permute(1, 0, 2, 3).contiguous(), self.captions[i]


def _check_readable(root: Path, names: List[str], flag: str) -> None:
    """ValueError naming the empty (0-byte) files of a caption folder, as an interrupted copy or download leaves them,
    before the model loads. Before: each was found when a step first drew it, at any step of a long run, and a run
    resumed once the file was fixed or left out is refused (its inputs changed). (Other files are decoded only when
    drawn.)"""
    empty = [name for name in names if (root / name).stat().st_size == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ValueError(f"{flag} {str(root)!r}: {shown} {'is' if len(empty) == 1 else 'are'} empty (0 bytes); "
                         "copy the file(s) again, or leave them out of the folder and its metadata.jsonl.")


def _decode_problem(err: Exception) -> str:
    """What a decoder's ``err`` says is wrong with a file (:func:`~dit_accel.videos.load_video`'s BadFileError: its
    problem, not a second "cannot be decoded" around it)."""
    if isinstance(err, BadFileError):
        return err.problem
    return f"cannot be decoded ({type(err).__name__}: {' '.join(str(err).split())[:100]})"


def _probe(path: Path, frames: int) -> None:
    """Decode ``path`` as a training sample takes it, through the reader :meth:`CaptionDataset.item` uses
    (:func:`~dit_accel.videos.count_frames`: the frames are dropped as they decode): a gif's first ``frames`` frames
    (a gif is read whole all the same), a video file's header and first frame, a picture whole (a JPEG at 1/8 size:
    its whole stream is read all the same). A video's other frames are not decoded here: at 480p they cost about
    0.02 s each, 1.9 s for an 81-frame clip against 0.5 s for the first (2 cores), minutes to an hour at start-up
    for a folder of thousands of clips, in every launched process. Raises what the decoder raises."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        from PIL import Image

        with Image.open(path) as im:
            _refuse_animated(path, im)
            im.draft(None, (64, 64))
            im.load()
        return
    from ..videos import count_frames

    count_frames(path, max_frames=frames if path.suffix.lower() == ".gif" else 1)


def _check_decodable(root: Path, names: List[str], flag: str, frames: int) -> None:
    """BadFileError naming the first file of a caption folder that does not open, or whose frames :func:`_probe` reads
    do not decode (a damaged or truncated copy, a text file renamed .png), before the model loads, up to 8 files at a
    time. Before: found only when a step first drew it, possibly hours into a run. What :func:`_probe` decodes of each
    file: a video file damaged after its first frame is still found when a step draws it."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(name: str) -> Optional[Exception]:
        try:
            _probe(root / name, frames)
        except Exception as err:  # PIL, imageio and ffmpeg raise many types for damaged files
            return err
        return None

    # (ffmpeg runs as processes; every launched process checks its folder: a share of the cores each)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit() else 1
    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 1) // max(local, 1)))) as pool:
        problems = list(pool.map(problem, names))
    bad = [(name, p) for name, p in zip(names, problems) if p is not None]
    if bad:
        name, first = bad[0]
        others = f"; {len(bad) - 1} more file(s) of the folder do not decode either" if len(bad) > 1 else ""
        if isinstance(first, AnimatedImageError):  # (decodes: what to do differs)
            raise AnimatedImageError(first.path, f"{first.problem}{others}", first.expected)
        raise BadFileError(root / name, f"{_decode_problem(first)}{others}",
                           f"an image ({', '.join(IMAGE_EXTENSIONS)}) or a video ({', '.join(VIDEO_EXTENSIONS)}) "
                           f"that decodes: copy the file(s) again, or leave them out of {flag} {str(root)!r} and its "
                           "metadata.jsonl")


def _generator(*parts: int) -> torch.Generator:
    # A stable integer from the parts; Python's hash() is salted per process, so not that.
    value = 0x9E3779B9
    for p in parts:
        value = (value * 1_000_003 + int(p) + 0x632BE5AB) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def sample_indices(n_items: int, *, seed: int, step: int, batch: int, rank: int, world: int) -> List[int]:
    """Dataset indices for one rank at one optimizer step: epoch permutations from (seed, epoch).

    Global position ``p = step * batch * world + rank * batch + i`` maps to epoch
    ``p // n_items`` and slot ``p % n_items`` of that epoch's permutation, so the
    order depends only on (seed, step), never on earlier steps.
    """
    out, cache = [], {}
    for i in range(batch):
        pos = step * batch * world + rank * batch + i
        epoch, slot = divmod(pos, n_items)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n_items, generator=_generator(seed, 0xDA7A, epoch)).tolist()
        out.append(cache[epoch][slot])
    return out


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator for everything random in one step on one rank (noise, timesteps, prompts)."""
    return _generator(seed, 0x57E9, step, rank)


def check_batchable(dataset: CaptionDataset, batch_size: int) -> None:
    """Images (1 frame) and videos cannot share a batch; say so before training."""
    kinds = {dataset.num_frames(i) for i in range(len(dataset))}
    if batch_size > 1 and len(kinds) > 1:
        raise ValueError(
            f"{getattr(dataset, 'flag', '--data')} {str(dataset.root)!r} mixes images and videos; with --batch-size "
            f"{batch_size} their "
            "latents cannot be stacked. Use --batch-size 1 or a folder of one kind."
        )


def check_held_out(dataset: CaptionDataset, held_out: CaptionDataset) -> None:
    """ValueError when the held-out folder (``--eval-data``) holds files the training folder holds too (the same
    bytes, under any name). Before: only the same folder was refused, so clips copied into ``--eval-data`` and left in
    ``--data`` made a "held-out" loss measured on clips the run trains on."""
    from ..atomic_files import sha256_file

    by_size: dict = {}
    for name in dataset.files:
        by_size.setdefault((dataset.root / name).stat().st_size, []).append(name)
    digests: dict = {}  # (training files hashed once, and only those of a size a held-out file has)
    shared = []
    for name in held_out.files:
        path = held_out.root / name
        for other in by_size.get(path.stat().st_size, ()):
            if other not in digests:
                digests[other] = sha256_file(dataset.root / other)
            if digests[other] == sha256_file(path):
                shared.append(f"{name} = {other}" if name != other else name)
                break
    if shared:
        shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise ValueError(f"{held_out.flag} {str(held_out.root)!r} holds {len(shared)} file(s) that {dataset.flag} "
                         f"{str(dataset.root)!r} trains on too ({shown}): the held-out loss would be measured on "
                         "training clips. Leave them out of one of the folders (and its metadata.jsonl).")


def stack(items: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(items))
