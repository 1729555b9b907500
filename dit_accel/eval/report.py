"""Report files of ``dit-accel eval``: report.md, pareto.png, grid.png.

All three are rendered from the results dict that is also saved as results.json.
With ground-truth scores (``results["groundtruth"]``, tiny-shapes prompts) the
table gets their columns and the Pareto plot's quality axis is the fraction of
videos correct on every criterion.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from ..atomic_files import atomic_write, atomic_write_text

__all__ = ["write_report", "plot_pareto", "frame_grid", "markdown_table", "ProgressLine", "QuietLog",
           "progress_bar"]


class ProgressLine(str):
    """A line an eval logs about its progress (e.g. how many dense samples came from the cache), not a warning or
    a failure: ``dit-accel eval --quiet`` leaves it off the terminal (results.json and report.md keep the counts)."""


class QuietLog:
    """:func:`~dit_accel.eval.runner.run_eval`'s ``log`` for ``dit-accel eval --quiet``: warnings and failures go to
    ``emit``; :class:`ProgressLine` s and the eval's progress bars (:func:`progress_bar`) are left off."""

    def __init__(self, emit=print) -> None:
        self.emit = emit

    def __call__(self, line) -> None:
        if not isinstance(line, ProgressLine):
            self.emit(line)


def progress_bar(log, **options):
    """A tqdm bar for one of the eval's loops, off under a :class:`QuietLog` (before, ``--quiet`` kept the bars)."""
    from tqdm.auto import tqdm

    return tqdm(disable=isinstance(log, QuietLog), **options)


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _time(seconds) -> str:
    """A time cell: 3 significant figures in s or ms (:func:`dit_accel._util.format_time`), ``-`` when absent."""
    from .._util import format_time

    return "-" if seconds is None else format_time(seconds)


def _speedup(value) -> str:
    return f"{value:.2f}x" if value else "-"


def percent_down(fraction: float) -> str:
    """``fraction`` as a percent to a tenth, rounded down: a share of the ideal printed beside an "at least" target
    never reads as met when it is not (0.7996 is "79.9%", not "80.0%"; whole percents printed 0.796 as "80%")."""
    import math
    from decimal import ROUND_FLOOR, Decimal

    if not math.isfinite(fraction):
        return f"{fraction}"
    return f"{(Decimal(repr(float(fraction))) * 100).quantize(Decimal('0.1'), rounding=ROUND_FLOOR)}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _config_text(config: dict, ran_on_grid=None) -> str:
    """The row's settings as given, then, per token grid where the method ran others (a ``fit=True`` Tile's
    fitted tile and window: ``summary.ran_on_grid``), those."""
    skip = {"label", "method", "plan"}
    # (a TileStrategy's windows hash: its first 12 digits tell two files apart in a table)
    text = ", ".join(f"{k}={v[:12] if k == 'windows_sha256' and isinstance(v, str) else v}"
                     for k, v in config.items() if k not in skip)
    for grid, ran in (ran_on_grid or {}).items():
        changed = [f"{k}={_as_tuple(v)}" for k, v in ran.items() if k not in skip
                   and _as_tuple(v) != _as_tuple(config.get(k))]
        if changed:
            text += f"; ran on grid {grid}: " + ", ".join(changed)
    if isinstance(config.get("plan"), dict):  # a SparsePlan: its one-line summary, not its JSON
        from ..plans.sparse_plan import SparsePlan

        try:
            summary = SparsePlan.from_json(config["plan"]).summary_line()
        except ValueError as err:
            summary = f"plan ({err})"
        return summary.replace("|", "/") + (f"; {text}" if text else "")
    return text or "defaults"


def _as_tuple(value):
    """Lists (a row read back from JSON) as the tuples they were."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _ran_on_grid(row: dict):
    return (row.get("summary") or {}).get("ran_on_grid")


def write_report(results: dict, path) -> None:
    """One table row per method: quality beside speed, then settings and skipped metrics."""
    header = ["method", "config", "density", "PSNR dB", "SSIM", "LPIPS", "CLIP", "FID vs dense", "FID vs real",
              "transformer", "end-to-end", "speedup (transformer)", "speedup (e2e)", "VAE decode", "text enc"]
    criteria = (results.get("groundtruth") or {}).get("criteria", [])
    if criteria:  # ground truth first: it is the quality that matters here
        header[3:3] = [f"GT {name}" for name in criteria]
    table = []
    for r in results["rows"]:
        t = r.get("times") or {}
        if r.get("error"):
            # (on one line: a Triton compile error's lines broke the table, each later row out of its columns)
            error = " ".join(r["error"].split()).replace("|", "/")
            table.append([r["label"], _config_text(r["config"]), "failed: " + error]
                         + ["-"] * (len(header) - 3))
            continue
        gt = [_fmt((r.get("groundtruth") or {}).get(name), 3) for name in criteria]
        table.append([r["label"], _config_text(r["config"], _ran_on_grid(r)), r.get("density"), *gt,
                      _fmt(r.get("psnr"), 2), _fmt(r.get("ssim"), 4), _fmt(r.get("lpips"), 4), _fmt(r.get("clip"), 2),
                      _fmt(r.get("fid_dense"), 4), _fmt(r.get("fid_real"), 4), _time(t.get("transformer")),
                      _time(t.get("total")), _speedup(r.get("speedup_transformer")), _speedup(r.get("speedup_e2e")),
                      _time(t.get("vae_decode")), _time(t.get("text_encoder"))])
    s = results["settings"]
    v = results["versions"]
    lines = ["# dit-accel eval report", ""]
    if results.get("note"):
        lines += [f"**Note: {results['note']}.**", ""]
    lines += [markdown_table(header, table), "",
              f"PSNR/SSIM/LPIPS: against the dense output with the same prompt and seed (PSNR capped at 100 dB). "
              f"Times: median of {s['repeats']} run(s) per sample set, per video. "
              f"Density: visited block fraction of sparse attention calls."
              + (" GT: ground truth, the fraction of videos judged right against their prompt "
                 "(dit_accel.eval.groundtruth; 'all' = every criterion at once)." if criteria else ""), "",
              "## Settings", "",
              f"- model: `{s['model']}`, device {s['device']}, dtype {s['dtype']}",
              f"- frames {s['frames']}, {s['height']}x{s['width']}, steps {s['steps']}, "
              f"guidance {s['guidance_scale']}, seeds {s['seeds']}, {len(s['prompts'])} prompt(s)",
              f"- dense baseline: {results['dense_generated']} generated, {results['dense_cached']} from cache"
              + (" (cached samples keep the timings measured when they were generated)"
                 if results.get("dense_times_from_cache") else ""),
              "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None), ""]
    if results.get("skipped"):
        lines += ["## Skipped metrics", ""] + [f"- {line}" for line in results["skipped"]] + [""]
    lines += temporal_section(results) + paired_section(results) + provenance_section(results)
    atomic_write_text(path, "\n".join(lines))


_PAIRED_COLUMNS = (("groundtruth", "GT all - dense", 3), ("psnr", "PSNR dB", 2), ("ssim", "SSIM", 4),
                   ("lpips", "LPIPS", 4), ("clip", "CLIP - dense", 2), ("time_transformer", "transformer s - dense", 3),
                   ("time_total", "end-to-end s - dense", 3))


def _interval(summary, digits: int) -> str:
    if not summary:
        return "-"
    text = f"{summary['mean']:+.{digits}f}" if summary.get("ci") is None else \
        f"{summary['mean']:.{digits}f} [{summary['ci'][0]:.{digits}f}, {summary['ci'][1]:.{digits}f}]"
    return text + ("" if summary.get("meaningful") else " (n<5)")


def paired_section(results: dict) -> List[str]:
    """report.md's paired statistics: per row and metric the mean of the per-sample differences against
    dense (same prompt and seed) with its 95% t-interval, the verdict, and the paired test against the best
    other row; the dense-vs-dense floor rows first."""
    from .stats import MIN_PAIRS

    rows = [r for r in results["rows"][1:] if r.get("paired")]
    if not rows:
        return []
    keys = [c for c in _PAIRED_COLUMNS if any(c[0] in r["paired"] for r in rows)]
    table = []
    for r in rows:
        cells = []
        for key, _, digits in keys:
            summary = r["paired"].get(key)
            verdict = (r.get("verdict") or {}).get(key, "")
            mark = ("" if r.get("floor") or not summary else
                    " =" if verdict.startswith("indistinguishable") else
                    " *" if verdict.startswith(("better", "worse", "differs")) else "")
            cells.append(_interval(summary, digits) + mark)
        n = max((s["n"] for s in r["paired"].values()), default=0)
        table.append([r["label"] + (" (floor)" if r.get("floor") else ""), str(n), *cells])
    lines = ["## Paired statistics against dense", "",
             markdown_table(["row", "pairs", *[name for _, name, _ in keys]], table), "",
             "Each cell: the mean over (prompt, seed) pairs and its 95% t-interval. PSNR/SSIM/LPIPS are distances "
             "to dense on the same pair; the columns marked '- dense' are the row's value minus dense's on the "
             "same pair (ground truth: 1 = the video is right on every criterion). Rows marked (floor) are dense "
             "against dense: another seed pairing, and dense attention through another backend. "
             "'=': indistinguishable from dense (within the floor); '*': a significant difference beyond the "
             "floor. '(n<5)': fewer than 5 pairs, the interval is not meaningful.", ""]
    notes = [f"- {r['label']}: {r['note']}" for r in results["rows"] if r.get("floor") and r.get("note")]
    significant, tests = [], []
    for r in rows:
        if r.get("floor"):
            continue
        for key, name, digits in keys:
            verdict = (r.get("verdict") or {}).get(key)
            # (below MIN_PAIRS pairs the list claimed "worse than dense" of 2 samples with no word of their count)
            few = "" if r["paired"].get(key, {}).get("meaningful", True) else \
                f" (n = {r['paired'][key]['n']} < {MIN_PAIRS} pairs: not meaningful)"
            if verdict and verdict.startswith(("better", "worse", "differs")):
                significant.append(f"- {r['label']}, {name}: {verdict}{few}")
            test = (r.get("tests") or {}).get(key)
            if test:
                word = "significant" if test["significant"] else "not significant"
                tests.append(f"- {r['label']} vs {test['against']}, {name}: difference {test['mean']:+.{digits}f}, "
                             f"t = {test['t']:.2f}, p = {test['p']:.3g} ({word}, n = {test['n']}"
                             + (f" < {MIN_PAIRS} pairs: not meaningful" if test["n"] < MIN_PAIRS else "") + ")")
    lines += notes + ([""] if notes else [])
    lines += ["### Significant differences from dense", ""] + (significant or ["- none beyond the floor"]) + [""]
    if tests:
        lines += ["### Paired t-tests against the best other row", ""] + tests + [""]
    return lines


def temporal_section(results: dict) -> List[str]:
    """Per row of a video eval: motion, motion against dense, the temporal error and the frozen / looping
    fractions (dit_accel.eval.temporal)."""
    rows = [r for r in results["rows"] if r.get("temporal")]
    if not rows:
        return []
    table = [[r["label"], _fmt(r["temporal"]["motion"], 4), _fmt(r["temporal"]["motion_ratio"], 3),
              _fmt(r["temporal"]["temporal_error"], 4), _fmt(r["temporal"]["frozen"], 3),
              _fmt(r["temporal"]["looping"], 3)] for r in rows]
    return ["## Temporal check", "",
            markdown_table(["row", "motion", "motion / dense", "temporal error", "frozen", "looping"], table), "",
            "motion: mean change between consecutive frames (0-1 scale); motion / dense: the same against the "
            "dense video of the pair (well below 1: the method freezes motion); temporal error: mean |change - "
            "dense's change|; frozen / looping: the fraction of videos detected still or repeating a short "
            "loop (dit_accel.eval.temporal).", ""]


def provenance_section(results: dict) -> List[str]:
    prov = results.get("provenance")
    if not prov:
        return []
    git = prov.get("git") or {}
    lines = ["## Provenance", "",
             f"- prompts: {prov['prompt_count']}, sha256 `{prov['prompts_sha256'][:16]}`"
             + (f"; file {prov['prompt_file']} sha256 `{prov['prompt_file_sha256'][:16]}`"
                if prov.get("prompt_file") else ""),
             f"- seeds: {prov['seeds']}",
             f"- dit_accel {prov['dit_accel']}" + (f", commit `{git['commit'][:12]}`" + (" (uncommitted changes)"
                                                                                    if git.get("dirty") else "")
                                                   if git else " (not a git checkout)"),
             "- " + ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()),
             f"- device: {prov['device']}"]
    for r in results["rows"][1:]:
        used = r.get("backends_used")
        if used:
            lines.append(f"- {r['label']} backends: " + ", ".join(f"{k}={v}" for k, v in used.items()))
    return lines + [""]


def plot_pareto(results: dict, path) -> None:
    """Quality against transformer speedup, one point per method/config: ground truth ("all" criteria
    right) and PSNR when the results have ground-truth scores, else PSNR and SSIM against dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("psnr", "PSNR vs dense (dB)"), ("ssim", "SSIM vs dense"))
    if results.get("groundtruth"):
        panels = (("groundtruth", "ground truth: videos right on every criterion"), ("psnr", "PSNR vs dense (dB)"))
    for ax, (key, name) in zip(axes, panels):
        for r in rows:
            x = r.get("speedup_transformer") or (1.0 if r["label"] == "dense" else None)
            y = (r.get("groundtruth") or {}).get("all") if key == "groundtruth" else r.get(key)
            if x is None or y is None:
                continue
            err = _error_bar(r, key, y)
            if err is not None:  # the paired 95% interval of the row's difference, drawn around its point
                ax.errorbar([x], [y], yerr=err, fmt="o", ms=6, capsize=3)
            else:
                ax.scatter([x], [y], s=40)
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("transformer speedup vs dense (x)")
        ax.set_ylabel(name)
        if key == "groundtruth":
            ax.set_ylim(-0.05, 1.05)  # a fraction of videos
        ax.grid(alpha=0.3)
    title = f"{results['settings']['model']} on {results['settings']['device']}"
    if results.get("note") and "RANDOM" in results["note"]:
        title += " (random-weight tiny model)"
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def _error_bar(row: dict, key: str, y: float):
    """``[[below], [above]]`` of the row's paired interval on the plotted metric, or None."""
    summary = (row.get("paired") or {}).get(key)
    if not summary or not summary.get("ci"):
        return None
    lo, hi = summary["ci"]
    return [[max(summary["mean"] - lo, 0.0)], [max(hi - summary["mean"], 0.0)]]


def frame_grid(labels: List[str], videos: List[np.ndarray], path, columns: int = 4, diff_gain: float = 4.0) -> None:
    """The first sample of every row side by side: rows = methods (the first, dense, is the reference),
    columns = evenly spaced frames, each followed by its difference map ``|frame - dense| * diff_gain``.
    Column headers name the frame; under every tile of a method row, its PSNR against dense."""
    from PIL import Image, ImageDraw

    from .metrics import psnr_per_frame

    if not videos:
        return
    n_frames = videos[0].shape[0]
    picks = sorted(set(np.linspace(0, n_frames - 1, min(columns, n_frames)).round().astype(int).tolist()))
    h, w = videos[0].shape[1:3]
    tile_w, label_w, header_h, caption_h = max(w, 72), 110, 16, 14
    row_h = h + caption_h
    grid = Image.new("RGB", (label_w + 2 * tile_w * len(picks), header_h + row_h * len(videos)), "white")
    draw = ImageDraw.Draw(grid)
    for j, f in enumerate(picks):
        draw.text((label_w + 2 * j * tile_w + 2, 2), f"frame {f}", fill="black")
        draw.text((label_w + (2 * j + 1) * tile_w + 2, 2), f"|diff| x{diff_gain:g}", fill="black")
    reference = videos[0]
    for i, (label, video) in enumerate(zip(labels, videos)):
        top = header_h + i * row_h
        draw.text((4, top + h // 2 - 6), label[:18], fill="black")
        psnr = psnr_per_frame(video, reference).tolist() if i else None
        for j, f in enumerate(picks):
            frame = video[min(f, video.shape[0] - 1)]
            ref = reference[min(f, reference.shape[0] - 1)]
            diff = np.clip(np.abs(frame.astype(np.float32) - ref.astype(np.float32)) * diff_gain, 0, 255)
            left = label_w + 2 * j * tile_w
            grid.paste(Image.fromarray(np.ascontiguousarray(frame)), (left, top))
            grid.paste(Image.fromarray(diff.astype(np.uint8)), (left + tile_w, top))
            caption = "reference" if psnr is None else f"{psnr[min(f, len(psnr) - 1)]:.1f} dB"
            draw.text((left + 2, top + h), caption, fill="black")
    atomic_write(path, grid.save)
