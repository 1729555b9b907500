"""Write and read generated videos: mp4, gif, or PNG frames.

``save_video`` takes whatever a Diffusers pipeline returns (a list of PIL
images, a uint8 array ``[F, H, W, 3]``, a float array in ``[0, 1]``, or a
torch tensor of either kind) and picks the format from the path:

- ``*.mp4``: H.264 through imageio-ffmpeg, no resizing. Even sizes use
  ``yuv420p`` (plays everywhere); an odd width or height uses ``yuv444p`` so the
  file decodes back to the exact requested size instead of being rescaled.
- ``*.gif``: Pillow, looping, at most 50 fps. Identical consecutive frames, which GIF merges,
  are expanded again by :func:`load_video` so the frame count round-trips.
- ``*.png``: one frame -> that PNG; several frames -> ``<stem>_00000.png``, ...
  next to it.
- a path without suffix (or an existing directory): a folder of
  ``frame_00000.png``, ...

``load_video(path)`` reads any of these back as ``uint8 [F, H, W, 3]``, and every frame of an animated PNG or
WebP.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ._util import DitAccelWarning, file_in_the_way
from .atomic_files import (BadFileError, atomic_write, commit_files, commit_journal, finish_commit, finish_for_reader,
                           is_temp_name, locked, remove_stale_temps)

__all__ = ["GifRateWarning", "save_video", "video_files", "load_video", "count_frames", "to_uint8_frames", "output_files",
           "frames_journal", "pending_journals", "pil_rgb", "VIDEO_SUFFIXES", "MAX_FPS"]

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")
MAX_FPS = 1000  # frames per second save_video takes: far past what a player shows
_GIF_TAG = b"dit_accel"
_PICTURE_SUFFIXES = (".png", ".apng", ".gif", ".webp")  # read by Pillow, every frame of an animated one
_GIF_MAX_FPS = 50  # GIF delays are in 1/100 s, and players show a delay under 2/100 s as 10/100 s


def to_uint8_frames(frames) -> np.ndarray:
    """Normalise frames to a contiguous ``uint8`` array ``[F, H, W, 3]``.

    Accepts a list/tuple of PIL images or arrays, or one array/tensor shaped
    ``[F, H, W, C]``, ``[H, W, C]`` (one frame), ``[1, F, H, W, C]`` (a batch of
    one) with C in 1, 3, 4 (alpha dropped), uint8 or float in ``[0, 1]``.
    """
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, (list, tuple, numbers.Number))
                                                             for f in frames):
        try:  # nested Python lists of numbers: one array (each level read as an image, the numbers had no shape)
            frames = np.asarray(frames)
        except ValueError:
            raise ValueError("frames is a nested list whose lists differ in length; give [F, H, W, 3] numbers, "
                             "an array or a list of images") from None
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is empty: nothing to save")
        items = [to_uint8_frames(f) if not _is_pil(f) else pil_rgb(f)[None] for f in frames]
        if any(len(x) != 1 for x in items):  # [video, video] would keep one frame of each
            raise ValueError(f"frames is a list of {len(frames)} items holding {[len(x) for x in items]} frames; a "
                             "list must hold one image per frame. Pass one video as an array [F, H, W, 3], or "
                             "concatenate the videos first")
        sizes = sorted({x.shape[1:3] for x in items})
        if len(sizes) > 1:
            raise ValueError(f"the frames have different sizes (H, W) {sizes}; all frames of a video must have one "
                             "size: resize them first")
        return np.ascontiguousarray(np.concatenate(items))
    if _is_pil(frames):
        return pil_rgb(frames)[None]
    import torch

    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy() if frames.is_floating_point() else frames.cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim == 3 + 1 and arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
        arr = np.moveaxis(arr, 1, -1)  # [F, C, H, W] -> [F, H, W, C]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"frames has shape {tuple(np.shape(frames))}; expected [F, H, W, 3] (or a list of images), "
            "channels last, 1/3/4 channels"
        )
    if arr.shape[0] == 0:
        raise ValueError("frames is empty: nothing to save")
    if 0 in arr.shape[1:3]:
        raise ValueError(f"frames has shape {tuple(arr.shape)}: a frame of height or width 0 holds no image")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            bad = ~np.isfinite(arr)
            if bad.any():  # painted black, a broken run would pass for a dark video
                from .errors import NonFiniteOutputError

                frames_bad = np.flatnonzero(bad.reshape(arr.shape[0], -1).any(-1))
                raise NonFiniteOutputError(
                    f"the frames hold {int(bad.sum())} non-finite values (NaN or inf) in {len(frames_bad)} of "
                    f"{arr.shape[0]} frames (first: frame {int(frames_bad[0])}); nothing was saved, an earlier "
                    "output is unchanged. The model produced them: check its weights (a NaN in a checkpoint or a "
                    "VSA gate) or run in float32/bfloat16 where float16 overflows")
            lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
            # Clipping a 0-255 or [-1, 1] float video would silently save a white or dark one.
            if lo < -0.01 or hi > 1.01:
                raise ValueError(f"float frames must lie in [0, 1]; got min {lo:.4g}, max {hi:.4g}. Divide 0-255 "
                                 "frames by 255 (or pass uint8), map [-1, 1] frames with (x + 1) / 2")
            arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.integer):
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 255:  # clipping 16-bit or signed frames would save a white or dark video
                raise ValueError(f"integer frames must lie in [0, 255]; got min {lo}, max {hi}. Scale 16-bit frames "
                                 "to 8 bits (x // 257), or pass float frames in [0, 1]")
            arr = arr.astype(np.uint8)
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        else:
            raise TypeError(f"frames dtype {arr.dtype} is not supported; pass uint8 or float in [0, 1]")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def save_video(frames, path, fps: int = 16) -> Path:
    """Save frames as mp4, gif, a PNG (one frame) or PNG frames; returns the path written.

    Args:
        frames: list of PIL images / arrays, or an array ``[F, H, W, 3]`` (uint8,
            or float in ``[0, 1]``), see :func:`to_uint8_frames`.
        path: output path; the suffix picks the format (module docstring).
            Parent folders are created.
        fps: frames per second for mp4 and gif, from 0.01 to :data:`MAX_FPS` (a gif: at most 50, and its
            delays are whole 1/100 s: 16 plays at 16.7; a :class:`GifRateWarning` where that is more than 5% off).

    Example::

        save_video(pipe(prompt).frames[0], "outputs/cat.mp4", fps=16)
    """
    arr, path, suffix, fps = _checked(frames, path, fps)
    with locked(path, wait=False):  # one writer per output: a second one is refused, never mixed with this one
        _write(arr, path, suffix, fps)
    return path


def video_files(frames, path, fps: int = 16) -> tuple:
    """What :func:`save_video` would write at ``path``, as a set for a writer that commits it together with other
    files (``atomic_files.commit_files``: ``dit-accel generate``'s video, comparison and sidecar):
    ``({final path: write(temporary)}, [files of an earlier output at path that these leave behind])``. The
    arguments are checked as :func:`save_video` checks them; a killed earlier save's frames are put in place first."""
    arr, path, suffix, fps = _checked(frames, path, fps)
    remove_stale_temps(path.parent)
    return _files(arr, path, suffix, fps)


def _checked(frames, path, fps) -> tuple:
    """:func:`save_video`'s arguments checked: ``(uint8 frames, path, suffix, fps)``; the parent folder made."""
    arr = to_uint8_frames(frames)
    # (NaN and inf pass "> 0" and failed deep in ffmpeg or the GIF writer; numpy numbers are numbers)
    # (past about 2**31 ffmpeg refused the rate: its log on stderr, then a raw FileNotFoundError for a video it never
    # wrote; --fps of dit-accel generate has the same bound)
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not math.isfinite(fps) or not 0.01 <= fps <= MAX_FPS:
        raise ValueError(f"fps={fps!r} is invalid: must be a finite number >= 0.01 and at most {MAX_FPS} "
                         "(frames per second), e.g. 16")
    fps = float(fps)  # (imageio-ffmpeg refuses numpy numbers)
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"path={path!r} is invalid: give a file path (.mp4, .gif, .png) or a folder path")
    path = Path(path).expanduser()  # (before: "~/out.mp4" was written to a folder named "~" in the working one)
    suffix = path.suffix.lower()
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise ValueError(
            f"cannot write {path.name!r}: unknown suffix {suffix!r}; use .mp4, .gif, .png, or a folder path"
        )
    if suffix == ".gif" and len(arr) > 1:  # (one frame: no rate to play)
        _check_gif_fps(path, fps)
    _check_output_path(path, suffix, len(arr))
    path.parent.mkdir(parents=True, exist_ok=True)
    return arr, path, suffix, fps


class GifRateWarning(DitAccelWarning):
    """A gif written at an fps it cannot play at (its delays are whole 1/100 s, at least 2/100 s)."""


def _check_gif_fps(path: Path, fps: float) -> None:
    """A :class:`GifRateWarning` where a gif plays more than 5% off ``fps``, in the words of ``dit-accel generate``'s note
    (before: fps=1000 was written at 50 fps, 20x slow, and 40 at 50, silently). A warning, not a refusal, as
    generate notes it: the frames are right, only the rate is not (16 plays at 16.7 unwarned)."""
    shown = 1000.0 / _gif_frame_ms(fps)
    if abs(shown - fps) > 0.05 * fps:
        import warnings

        warnings.warn(f"{path.name} plays at {shown:.3g} frames per second for fps={fps:g}: a GIF's frame delays are "
                      f"whole hundredths of a second, at least 0.02 s (at most {_GIF_MAX_FPS} fps); write .mp4 for "
                      "this fps, or give one that divides 100 (10, 20, 25, 50)", GifRateWarning, stacklevel=4)


def _check_output_path(path: Path, suffix: str, num_frames: int) -> None:
    """ValueError when something in the way is of the other kind: a file where the frame folder (or a parent
    folder) goes, a folder where the video file goes."""
    parent = file_in_the_way(path if not suffix else path.parent)
    if parent is not None:
        raise ValueError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a folder; give another "
                         "path, or a file suffix (.mp4, .gif, .png) to write a file")
    if suffix and path.is_dir() and output_files(path, num_frames) == [path]:
        raise ValueError(f"cannot write {str(path)!r}: it is a folder; give a file path, or a path without suffix "
                         "to write PNG frames into a folder")


def _write(arr, path: Path, suffix: str, fps) -> None:
    """:func:`save_video`'s writing, under the output's lock."""
    remove_stale_temps(path.parent)  # what killed writers left: each may be as large as a video
    files, remove = _files(arr, path, suffix, fps)
    if suffix in (".mp4", ".gif"):
        atomic_write(path, files[path])
    else:
        # The frames, and the removal of an earlier output's frames these do not overwrite, are one commit: a
        # kill leaves the earlier sequence or this one, never [new, new, old, old] (load_video finishes it).
        commit_files(files, frames_journal(path), remove=remove)


def _files(arr, path: Path, suffix: str, fps) -> tuple:
    """``({final path: write(tmp)}, [an earlier output's files to remove])`` of checked arguments."""
    for journal in pending_journals(path):  # a killed earlier writer's committed files go in first, never over these
        finish_commit(journal)
    if suffix == ".mp4":
        return {path: lambda tmp: _write_mp4(arr, tmp, fps)}, []
    if suffix == ".gif":
        return {path: lambda tmp: _write_gif(arr, tmp, fps)}, []
    if not suffix:
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
    files = output_files(path, len(arr))
    return ({file: (lambda tmp, frame=frame: _write_png(frame, tmp)) for frame, file in zip(arr, files)},
            _stale_frames(path, files))


def frames_journal(path) -> Path:
    """The commit journal of a PNG output at ``path``: inside a frame folder (it travels with a copy of the
    folder), beside a ``NAME.png`` sequence."""
    path = Path(path)
    return path / ".frames.dit_accel-commit.json" if not path.suffix else commit_journal(path)


def pending_journals(path) -> list:
    """The commit journals a killed writer of the output at ``path`` may have left, oldest writer's first:
    ``dit-accel generate``'s set (the video, its comparison and sidecar) beside it, and a PNG output's own frames
    (the same file for a ``NAME.png`` sequence; inside a frame folder)."""
    path = Path(path)
    journals = [commit_journal(path)]
    if path.suffix.lower() in (".png", ""):
        journals += [j for j in [frames_journal(path)] if j != journals[0]]
    return journals


def _stale_frames(path: Path, files: list) -> list:
    """Files an earlier :func:`save_video` at ``path`` wrote that the new output does not overwrite: frames past
    the new count, and the one-frame PNG beside a sequence (or the sequence beside a one-frame PNG), which
    :func:`load_video` would otherwise read instead of, or with, the new frames."""
    keep = {f.name for f in files}
    if path.suffix.lower() == ".png":
        pattern = re.compile(re.escape(path.stem) + r"_\d{5}\.png$")
        found = [p for p in path.parent.glob(f"{path.stem}_*.png") if pattern.match(p.name)]
        found += [path] if path.is_file() else []
    else:
        found = [p for p in path.glob("frame_*.png") if re.match(r"frame_\d{5}\.png$", p.name)]
    return [p for p in found if p.name not in keep and p.is_file()]


def output_files(path, num_frames: int) -> list:
    """The files :func:`save_video` writes for ``num_frames`` frames at ``path``: the path itself for a video
    or one-frame PNG, ``NAME_00000.png``... beside it for a PNG sequence, ``frame_00000.png``... in a folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".mp4", ".gif") or (suffix == ".png" and num_frames == 1):
        return [path]
    if suffix == ".png":
        return [path.with_name(f"{path.stem}_{i:05d}.png") for i in range(num_frames)]
    return [path / f"frame_{i:05d}.png" for i in range(num_frames)]


def load_video(path, max_frames: Optional[int] = None) -> np.ndarray:
    """Read a video written by :func:`save_video` (or any mp4/gif/png) as ``uint8 [F, H, W, 3]``; ``max_frames``: at
    most that many, from the first (a video file decodes no more of itself).

    ``path`` may be an mp4, a gif, a PNG, a PNG pattern base (``x.png`` written
    as ``x_00000.png``, ...) or a folder of PNG frames (sorted by name, numbers by value: ``2.png`` before
    ``10.png``).
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"path={path!r} is invalid: give the path of a video (.mp4, .gif, .png) or a frame folder")
    max_frames = _frame_limit(max_frames)
    path = Path(path).expanduser()  # (as save_video writes it)
    suffix = path.suffix.lower()
    # a set a killed writer committed (save_video's PNG frames, generate's video + comparison + sidecar): finished,
    # or refused
    for journal in pending_journals(path):
        if journal.exists():
            finish_for_reader(journal, path)
    if path.is_dir():  # not the temporaries a killed save_video left
        files = sorted((p for p in path.iterdir() if p.suffix.lower() == ".png" and not is_temp_name(p)),
                       key=_frame_order)
        if not files:
            raise FileNotFoundError(f"no .png frames in folder {path}")
        return _read_frames(files[:max_frames])
    if suffix == ".png" and not path.exists():
        pattern = re.compile(re.escape(path.stem) + r"_\d+\.png$")
        files = sorted((p for p in path.parent.glob(f"{path.stem}_*.png") if pattern.match(p.name)), key=_frame_order)
        if files:
            return _read_frames(files[:max_frames])
    if not path.exists():
        raise FileNotFoundError(f"no such video: {path}")
    # (an animated PNG or WebP: all its frames; before, a PNG gave its first frame alone and a WebP was "cannot be
    # decoded" by ffmpeg)
    read = (lambda: _read_gif(path)) if suffix in _PICTURE_SUFFIXES else (lambda: _read_ffmpeg(path, max_frames))
    return _decoded(path, read)[:max_frames]


def count_frames(path, max_frames: Optional[int] = None) -> int:
    """``len(load_video(path, max_frames))``, decoded as :func:`load_video` decodes them but without keeping them
    (a video file's frames are dropped as they come): a check that a clip's frames decode, at the memory of one
    frame. Raises what :func:`load_video` raises."""
    max_frames = _frame_limit(max_frames)
    file = Path(path).expanduser() if isinstance(path, (str, Path)) and str(path) else None
    if file is None or file.suffix.lower() in ("", *_PICTURE_SUFFIXES) or not file.is_file() \
            or any(journal.exists() for journal in pending_journals(file)):
        return len(load_video(path, max_frames))  # (pictures and gifs it reads whole; and each of its refusals)
    return _decoded(file, lambda: sum(1 for _ in _ffmpeg_frames(file, max_frames)))


def _frame_limit(max_frames) -> Optional[int]:
    """``max_frames`` of :func:`load_video` and :func:`count_frames` checked: None (all) or a whole number >= 1.
    Before: a PNG folder or sequence gave all its frames; 0 and -1 sliced the decoded frames (none, all but the last)
    where count_frames counted them all; 2.5 or "2" was a raw "slice indices must be integers"."""
    if max_frames is None:
        return None
    if isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral) or max_frames < 1:
        raise ValueError(f"max_frames={max_frames!r} is invalid: give a whole number >= 1 (at most that many frames, "
                         "from the first), or None for all of them")
    return int(max_frames)


def _decoded(path: Path, read):
    """``read()``; what the decoder raises for a truncated or damaged file, a BadFileError naming ``path``."""
    try:
        return read()
    except BadFileError:
        raise
    except Exception as err:  # PIL, imageio and ffmpeg raise many types for truncated or damaged files
        raise BadFileError(path, f"cannot be decoded ({type(err).__name__}: {' '.join(str(err).split())[:100]})",
                           "a whole mp4, gif or png") from None


def _frame_order(path: Path) -> tuple:
    """Sort key of a frame file: its name with each run of digits read as a number, so the frames of a tool that
    does not pad its numbers (ffmpeg's ``%d.png``: 1, 2, ..., 10) come in their order, not as 1, 10, 11, 2."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", path.name.lower()))


def _read_frames(files: list) -> np.ndarray:
    """A PNG sequence as ``[F, H, W, 3]``; a damaged frame, or frames of two sizes, is a BadFileError naming it."""
    frames = []
    for file in files:
        try:
            frames.append(_read_png(file))
        except BadFileError:
            raise
        except Exception as err:  # PIL raises many types for truncated or damaged files
            raise BadFileError(file, f"cannot be decoded ({type(err).__name__}: {' '.join(str(err).split())[:100]})",
                               "a whole png frame") from None
        if frames[-1].shape != frames[0].shape:
            raise BadFileError(file, f"is {frames[-1].shape[1]}x{frames[-1].shape[0]} but {files[0].name} is "
                                     f"{frames[0].shape[1]}x{frames[0].shape[0]}",
                               "frames of one size (a sequence of one video)")
    return np.stack(frames)


# ----------------------------------------------------------------------------- formats
def _is_pil(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def pil_rgb(img) -> np.ndarray:
    """``uint8 [H, W, 3]``. convert("RGB") clips 16-bit greyscale (a PNG's "I;16" or "I") at 255, a picture of
    nearly all white, and rounds a float ("F") image in [0, 1] to black: those are scaled instead."""
    if img.mode.startswith("I"):
        grey = np.clip(np.round(np.asarray(img).astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode == "F":  # as a float array: [0, 1], its range checked
        return to_uint8_frames(np.asarray(img, dtype=np.float32)[..., None])[0]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _write_png(frame: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(frame, "RGB").save(path)


def _read_png(path: Path) -> np.ndarray:
    """One frame of a PNG sequence; an animated PNG (before: its first frame alone, the others dropped) refused."""
    from PIL import Image

    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            raise BadFileError(path, f"is an animated PNG of {im.n_frames} frames, in a sequence of PNG frames",
                               "one picture per frame file (pass the animated PNG alone to read all its frames)")
        return pil_rgb(im)


def _write_mp4(arr: np.ndarray, path: Path, fps) -> None:
    import imageio.v2 as iio

    height, width = arr.shape[1:3]
    # yuv420p subsamples chroma 2x2 and libx264 rejects odd sizes; 4:4:4 keeps odd sizes exact.
    pixfmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    writer = iio.get_writer(
        str(path),
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat=pixfmt,
        macro_block_size=1,  # imageio would otherwise resize to multiples of 16
        ffmpeg_log_level="error",
        output_params=["-crf", "18"],
    )
    try:
        for frame in arr:
            writer.append_data(frame)
    finally:
        writer.close()


def _read_ffmpeg(path: Path, limit: Optional[int] = None) -> np.ndarray:
    return np.stack(list(_ffmpeg_frames(path, limit)))


def _ffmpeg_frames(path: Path, limit: Optional[int] = None):
    """The first ``limit`` (all: None) frames of a video file, one ``uint8 [H, W, 3]`` at a time; a file without
    any is a BadFileError."""
    import imageio.v2 as iio

    reader = iio.get_reader(str(path), format="FFMPEG")
    count, meta = 0, reader.get_meta_data()
    try:
        for frame in reader:
            yield np.asarray(frame, dtype=np.uint8)[..., :3]
            count += 1
            if count == limit:
                break
    finally:
        reader.close()
    if not count:
        raise BadFileError(path, "has no decodable frames", "a whole mp4, gif or png")
    # A file cut short after its header (a faststart mp4: the index first) decoded the frames that are there and
    # ended, silently (24 frames written, 11 read). Checked against the header's length where no audio track may be
    # the longer one, with room for a variable frame rate.
    seconds, fps = meta.get("duration"), meta.get("fps")
    if count != limit and "audio_codec" not in meta and isinstance(seconds, (int, float)) \
            and isinstance(fps, (int, float)) and math.isfinite(seconds * fps) and count < 0.9 * seconds * fps - 1:
        raise BadFileError(path, f"decodes {count} frames, and its header says {seconds:g} s at {fps:g} fps (about "
                                 f"{round(seconds * fps)}): it is cut short or damaged after frame {count - 1} (from 0)",
                           "a whole video file (copy or download it again)")


def _gif_frame_ms(fps) -> int:
    # GIF stores centiseconds; keep a multiple of 10 ms so merged frames are exact multiples.
    return max(20, int(round(100.0 / fps)) * 10)


def _write_gif(arr: np.ndarray, path: Path, fps) -> None:
    from PIL import Image

    ms = _gif_frame_ms(fps)
    images = [Image.fromarray(f, "RGB") for f in arr]
    comment = _GIF_TAG + f" frames={len(arr)} frame_ms={ms}".encode()
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=ms, loop=0, optimize=False, comment=comment
    )


def _read_gif(path: Path) -> np.ndarray:
    """Every frame of a gif, png (an animated one too) or webp; a frame that does not decode is named (a file
    damaged after its first frame: before, "cannot be decoded (IndexError: index out of range)")."""
    from PIL import Image

    with Image.open(path) as im:
        comment = im.info.get("comment", b"") or b""
        if isinstance(comment, str):
            comment = comment.encode()
        frames, durations = [], []
        while True:  # (not range(n_frames): a damaged file fails in n_frames, naming no frame)
            try:
                im.seek(len(frames))
                frames.append(pil_rgb(im))
            except EOFError:
                break
            except Exception as err:  # noqa: BLE001 - Pillow raises many types for a damaged frame
                raise BadFileError(path, f"cannot be decoded ({type(err).__name__}: {' '.join(str(err).split())[:100]}) "
                                         f"from frame {len(frames)} (from 0) on",
                                   "a whole file (copy or write it again)") from None
            durations.append(im.info.get("duration", 0))
    meta = dict(re.findall(rb"(\w+)=(\d+)", comment)) if comment.startswith(_GIF_TAG) else {}
    if b"frame_ms" in meta and len(frames) < int(meta.get(b"frames", 0)):
        # Pillow merged identical consecutive frames (durations summed): expand them again.
        ms = int(meta[b"frame_ms"])
        expanded = []
        for frame, dur in zip(frames, durations):
            expanded.extend([frame] * max(1, int(round(dur / ms))))
        frames = expanded
    return np.stack(frames)
