"""The calibration's report: ``report.md`` and a heatmap of method and density per layer x head, per step phase."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Sequence

from .._util import format_time
from ..eval.report import markdown_table
from ..plans.sparse_plan import SparsePlan, write_atomic
from .search import COST_TIE

__all__ = ["write_report", "plot_heatmap", "render_report", "heatmap_png", "check_outputs",
           "another_report"]


def _weights(values) -> str:
    return ", ".join(f"{w:.3g}" for w in values) if values else "uniform (not probed)"


def _gt_cell(gt) -> str:
    return "-" if not gt else " / ".join(f"{gt[k]:.2f}" for k in ("shape", "motion", "consistency"))


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(result: dict, path) -> Path:
    """``report.md`` of a calibration ``result`` (see :func:`dit_accel.calibrate.calibrate`), atomically."""
    return write_atomic(path, render_report(result))


def _budget_words(result: dict) -> str:
    """``"min_psnr 30.0 dB on the mean"``: the budget's PSNR rule as the validation applies it."""
    budget = result.get("budget") or {}
    if budget.get("min_psnr") is None:
        return "no PSNR budget"
    on = "the mean" if budget.get("min_psnr_on") == "the mean" else "the worst video"
    return f"min_psnr {budget['min_psnr']} dB on {on}"


def _ms(value) -> str:
    """A time in ms as a cell: 3 significant figures in ms or s (:func:`dit_accel._util.format_time`)."""
    return "-" if value is None else format_time(value / 1e3)


def _priced(result: dict) -> str:
    """How candidates were priced: ``modelled`` (the kernels' cost model), or ``timed on DEVICE`` under
    ``--costs measured``, whose times are measured and must not be called modelled."""
    if (result.get("cost_model") or {}).get("terms") == "measured":
        return f"timed on {(result.get('settings') or {}).get('device', 'this device')}"
    return "modelled"


def _validation_lines(result: dict) -> list:
    """Search and validation figures side by side, the plans validated in order, and the time against dense."""
    val = result.get("validation")
    lines = []
    if val:
        final, v = result["final"], val.get("final")
        gt_search = (result.get("groundtruth") or {}).get("plan")
        rows = [["search (the plan was chosen here)", str(result.get("search_videos", "-")), _fmt(final["psnr"]),
                 _fmt(final.get("psnr_worst")), _fmt(final["ssim"], 4), _gt_cell(gt_search)],
                ["validation (never searched on)", str(val["videos"]), _fmt(v["psnr"]) if v else "exact",
                 _fmt(v["psnr_worst"]) if v else "exact", _fmt(v["ssim"], 4) if v else "1.0000",
                 _gt_cell(v.get("groundtruth")) if v else "-"]]
        lines += ["## Search and validation", "",
                  f"Validation: prompts {', '.join(repr(p) for p in val['prompts'])} x seeds "
                  f"{', '.join(map(str, val['seeds']))}. A plan is written only if it meets the budget on the "
                  f"validation videos too ({_budget_words(result)}; tiny-shapes: and ground truth no worse than "
                  "dense's beyond chance per check, a one-sided sign test at 5%).", "",
                  markdown_table(["set", "videos", "PSNR vs dense (dB, mean)", "worst video (dB)", "SSIM",
                                  "GT shape / motion / consistency"], rows), ""]
        lines += ["Plans validated, cheapest first:", "",
                  markdown_table([f"{_priced(result)} time/sample", "search worst (dB)", "validation mean (dB)",
                                  "validation worst (dB)", "GT shape / motion / consistency", "passes"],
                                 [[_ms(t["modelled_ms"]), _fmt(t["search"]["psnr_worst"]), _fmt(t["psnr"]),
                                   _fmt(t["psnr_worst"]), _gt_cell(t.get("groundtruth")),
                                   "yes" if t["passes"] else "no"] for t in val["tried"]]), ""]
        base = val.get("baseline")
        if base is not None:
            v_text = (f"{v['psnr']:.2f} dB (worst {v['psnr_worst']:.2f})" if v else "exact (the dense plan)")
            lines += [f"Baseline on the same validation videos: {base['label']} at "
                      f"{format_time(base['modelled_ms'] / 1e3, '/sample')} {_priced(result)} (the plan: "
                      f"{format_time(result['final']['modelled_ms'] / 1e3)}): {base['psnr']:.2f} dB (worst "
                      f"{base['psnr_worst']:.2f}), GT shape / motion / consistency {_gt_cell(base.get('groundtruth'))}; "
                      f"the plan: {v_text}.", ""]
        if val["fell_back"]:
            lines += ["The cheapest plan that passed on the search videos failed on the validation videos; the "
                      "written plan is the next denser one that passed both" +
                      (" (none did: the dense plan)." if v is None else "."), ""]
    cost = result.get("cost_vs_dense")
    if cost:
        per_video = (f", {cost['per_video_ratio']:.1f}x one dense video" if "per_video_ratio" in cost else "")
        lines += [f"Calibration time: {result['seconds']['total']:.0f} s, {cost['ratio']:.1f}x one dense generation of "
                  f"the same {cost['videos']} videos ({cost['dense_generation_s']:.0f} s, measured in the validation "
                  f"stage){per_video}.", ""]
    return lines


def render_report(result: dict) -> str:
    """The text of ``report.md`` of a calibration ``result``."""
    s = result["settings"]
    final = result["final"]
    lines = [f"# Calibration of {s['model']}", "",
             f"Budget: {result['budget']}. Objective: {result['objective']}.", "",
             *([f"Note: {result['cost_terms_note']}", ""] if result.get("cost_terms_note") else []),
             f"Plan: `{result['plan_path']}` ({result['plan_summary']['phases']} phases, dense warm-up "
             f"{final['warmup_steps']} of {s['steps']} steps).", "",
             "## Result on the calibration prompts and seeds", ""]
    rows = [["dense", "-", "-", _ms(result["dense"]["attention_ms"]), _ms(result["dense"]["modelled_ms"]),
             "1.00", "-", "-"],
            ["calibrated plan", f"{final['psnr']:.2f}" if final["psnr"] is not None else "-",
             _fmt(final.get("psnr_worst")),
             _ms(final["attention_ms"]), _ms(final["modelled_ms"]),
             _fmt(result["dense"]["modelled_ms"] / final["modelled_ms"] if final["modelled_ms"] else None),
             _fmt(final["ssim"], 4), _fmt(final.get("max_layer_error"), 4)]]
    measured = result["cost_model"].get("terms") == "measured"
    priced = (f"priced attention (per sample, timed on {s['device']})" if measured else
              "modelled attention (per sample, GPU)")
    lines += [markdown_table(["run", "PSNR vs dense (dB, mean)", "worst video (dB)",
                              f"measured attention ({s['device']})", priced,
                              "priced speedup" if measured else "modelled speedup", "SSIM",
                              "max layer error (rel. L2)"], rows), ""]
    lines += _validation_lines(result)
    gt = result.get("groundtruth")
    if gt:
        keys = [k for k in ("colour", "shape", "motion", "consistency") if k in gt["dense"]]
        rule = ("; required: no check worse than dense's (--groundtruth)" if gt.get("required")
                else "; reported, not required")
        lines += [f"Ground truth (tiny-shapes; fraction of samples correct{rule}):", "",
                  markdown_table(["run"] + keys, [["dense"] + [_fmt(gt["dense"][k]) for k in keys],
                                                  ["calibrated plan"] + [_fmt(gt["plan"][k]) for k in keys]]), ""]
    def videos(t) -> str:
        made = t.get("videos_made")
        total = result.get("search_videos")
        if t.get("repeat_of"):
            return f"the plan of {t['repeat_of']}: not rerun"
        if t.get("stopped_early"):
            return f"{made} of {total} (stopped: a video under the budget)"
        return str(made if made is not None else total or "-")

    if s.get("search") == "warmup":
        how = ("--search warmup: a dense warm-up, then one candidate everywhere; candidates cheapest per call first, "
               "each one's least passing warm-up bisected, later ones only where cheaper than the best so far by "
               f"more than {100 * COST_TIE:g}%, at their longest such warm-up, then one step shorter, then by "
               "bisection; then the chosen plan's last dense step bridged by wider candidates of its method, the "
               "widest first, while they pass). The cheapest passing plan is kept")
    else:
        how = ("allocation: lambda is the price of error in modelled seconds; uniform: a step-structured plan at no "
               "more modelled cost than the allocation's). The cheapest passing plan is kept (within "
               f"{100 * COST_TIE:g}% of its cost, the one with the widest worst-video margin)")
    lines += ["## Search", "",
              f"{len(result['trace'])} verified plans ({how}: **{result.get('chosen') or '-'}**.", "",
              markdown_table(["plan", f"{_priced(result)} time/sample", "videos", "PSNR (dB, mean)", "worst video (dB)",
                              "GT shape / motion / consistency", "passes"],
                             [[t.get("plan") or f"lambda {t['lam']:.3g}", _ms(t["modelled_ms"]), videos(t),
                               _fmt(t["psnr"]), _fmt(t.get("psnr_worst")),
                               _gt_cell(t.get("groundtruth")), "yes" if t["passes"] else "no"]
                              for t in result["trace"]]), "",
              "## The plan per step phase", ""]
    heads = s["heads"]
    for phase in result["phase_tables"]:
        lines += [f"Steps {phase['steps'][0]}..{phase['steps'][1] - 1}:", "",
                  markdown_table(["layer"] + [f"head {h}" for h in range(heads)],
                                 [[str(l)] + labels for l, labels in enumerate(phase["labels"])]), ""]
    lines += ["`dense*`: a dense head inside a block-sparse launch.", "",
              "## Settings", "", f"- cost model: {result['cost_model']}",
              f"- candidates ({len(result['candidates'])}): " + ", ".join(c["label"] for c in result["candidates"]),
              f"- step buckets: {result['buckets']}",
              "- step weights per bucket (output error per unit of attention error per step, mean 1; "
              "--sensitivity): " + _weights(result.get("step_weights")),
              "- layer weights (the same per layer group, --layer-groups): " + _weights(result.get("layer_weights")),
              f"- samples: {result['samples']}",
              "- times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()),
              f"- prompts sha256: {result['prompts_sha256']}", ""]
    lines += ["Modelled times are predictions of the kernels' cost model (`dit_accel.kernels.cost`), not "
              "measurements; measured times are this machine's, wall clock of the attention calls (a plan's "
              "leading dense steps, read back from the dense run instead of computed, at the dense run's time: "
              "`replayed_steps` in calibration.json).", ""]
    if result.get("plan_sha256"):
        lines += [f"Written with the plan of content sha256 `{result['plan_sha256']}` (as one unit with "
                  "heatmap.png and calibration.json).", ""]
    return "\n".join(lines)


_COLOURS = {"dense": "#d9d9d9", "dense*": "#bdbdbd", "tile": "#4c72b0", "gna": "#55a868", "radial": "#c44e52",
            "sla": "#8172b2"}


def plot_heatmap(phase_tables: Sequence[dict], densities: Dict[str, float], path) -> Path:
    """One panel per step phase: layers x heads coloured by method, labelled with the visited density."""
    return write_atomic(path, heatmap_png(phase_tables, densities))


def heatmap_png(phase_tables: Sequence[dict], densities: Dict[str, float], plan_sha256: str = "") -> bytes:
    """The PNG bytes of :func:`plot_heatmap` (``plan_sha256`` in its metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    n = len(phase_tables)
    layers = len(phase_tables[0]["labels"]) if n else 0
    heads = len(phase_tables[0]["labels"][0]) if layers else 0
    fig, axes = plt.subplots(1, max(n, 1), figsize=(1.0 + 0.55 * heads * max(n, 1), 1.2 + 0.45 * layers),
                             squeeze=False)
    for ax, phase in zip(axes[0], phase_tables):
        image = [[to_rgb(_COLOURS.get(label.split()[0], "#ffffff")) for label in row] for row in phase["labels"]]
        ax.imshow(image, aspect="auto")
        for l, row in enumerate(phase["labels"]):
            for h, label in enumerate(row):
                density = densities.get(label, 1.0)
                ax.text(h, l, f"{density:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"steps {phase['steps'][0]}-{phase['steps'][1] - 1}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
    fig.legend(handles=[Patch(color=c, label=k) for k, c in _COLOURS.items()], loc="lower center", ncol=6,
               fontsize=7, frameon=False)
    fig.suptitle("method and visited density per layer x head", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    import io

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110,
                    metadata={"Description": f"plan sha256 {plan_sha256}"} if plan_sha256 else None)
    finally:
        plt.close(fig)
    return buffer.getvalue()


OUTPUT_FILES = ("report.md", "heatmap.png", "calibration.json")


def write_outputs(out, report_dir, plan: SparsePlan, result: dict, densities: Dict[str, float]) -> None:
    """The plan and its report folder (:data:`OUTPUT_FILES`) as one unit (:func:`dit_accel.atomic_files.commit_files`):
    after a kill at any point, and the next run's :func:`recover_outputs`, the previous complete set or the new
    one. Every file names the plan's content hash (report.md, calibration.json, heatmap.png's metadata)."""
    from ..atomic_files import commit_files, commit_journal
    from .._util import to_jsonable

    out, report_dir = Path(out), Path(report_dir)
    plan_text = json.dumps(plan.to_json(), indent=1) + "\n"
    result["plan_sha256"] = plan.content_hash()
    files = {out: plan_text,
             report_dir / "report.md": render_report(result),
             report_dir / "heatmap.png": heatmap_png(result["phase_tables"], densities, result["plan_sha256"]),
             report_dir / "calibration.json": json.dumps(to_jsonable(result), indent=1) + "\n"}
    commit_files(files, commit_journal(out))


def under_home(path):
    """``path`` with a leading ``~`` made the home folder, as :meth:`SparsePlan.save` reads it (a str stays a str);
    anything else as it is. Before, ``--out=~/plan.json`` put the plan and its report in a folder named ``~`` in the
    working one, where ``--plan ~/plan.json`` did not look."""
    if isinstance(path, (str, os.PathLike)) and str(os.fspath(path)).startswith("~"):
        return os.path.expanduser(path) if isinstance(path, str) else Path(path).expanduser()
    return path


def check_outputs(out, report_dir=None, capture_dir=None) -> None:
    """ValueError naming ``out`` or ``report_dir`` (None: ``PLAN_report/`` beside the plan) when
    :func:`write_outputs` could not write both, checked before the calibration runs: ``out`` a folder or under a
    file, ``report_dir`` a file or under one, the two overlapping, or ``capture_dir`` (``--capture``) at or under
    the plan or a report file.
    Before, a folder failed only at the end of the run; and ``out`` at ``report_dir/calibration.json`` (or another
    report file) got the report in place of the plan, silently: the plan was lost."""
    from .._util import file_in_the_way
    from ..plans.sparse_plan import file_to_write

    try:
        out = file_to_write(out, "the plan's", "plan.json")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"out: {exc}") from None
    report_dir, capture_dir = under_home(report_dir), under_home(capture_dir)
    default = report_dir is None
    if default:
        report_dir = out.with_name(out.stem + "_report")
    if not isinstance(report_dir, (str, os.PathLike)) or not str(os.fspath(report_dir)).strip():
        raise ValueError(f"report_dir={report_dir!r} is invalid: pass a folder path (default: PLAN_report/ beside "
                         "the plan)")
    report_dir = Path(report_dir)
    in_the_way = file_in_the_way(report_dir)
    if in_the_way is not None:
        where = "is a file" if in_the_way == report_dir else f"lies under {in_the_way}, a file"
        if default:  # (before: named report_dir=, which the user never gave)
            raise ValueError(f"the report folder {str(report_dir)!r} (the default beside the plan, "
                             f"{out.stem}_report) {where}; pass --report-dir DIR (report_dir=), a folder for "
                             f"{', '.join(OUTPUT_FILES)}, or another --out")
        raise ValueError(f"report_dir={str(report_dir)!r} {where}; pass a folder for {', '.join(OUTPUT_FILES)}")
    plan, folder = out.absolute(), report_dir.absolute()
    if plan in {folder / name for name in OUTPUT_FILES} or folder == plan or plan in folder.parents:
        raise ValueError(f"out={str(out)!r} and report_dir={str(report_dir)!r} overlap: the plan and the report "
                         f"files ({', '.join(OUTPUT_FILES)}) would be written to one path. Put the plan beside the "
                         "report folder, e.g. out=plan.json, report_dir=plan_report")
    foreign = another_report(out, report_dir)
    if foreign:  # (before: replaced silently; the other plan then had no report, or this one's)
        flag = f"the report folder {str(report_dir)!r} (beside the plan)" if default else \
            f"--report-dir {str(report_dir)!r} (report_dir=)"
        raise ValueError(f"{flag} already holds {foreign}: this run would replace it. Pass another --report-dir, "
                         f"e.g. {out.with_name(out.stem + '_report')}, or delete those files to replace them")
    if capture_dir is not None:
        # The dense run makes the capture folder: at the plan's path (or a report file's) the calibration ran to
        # its end and then failed to write there (IsADirectoryError), the whole run lost.
        capture = Path(capture_dir).absolute()
        for name, path in (("out", plan), *((f"report_dir's {f}", folder / f) for f in OUTPUT_FILES)):
            if capture == path or path in capture.parents:
                where = "at" if capture == path else "under"
                raise ValueError(f"--capture {str(capture_dir)!r} (capture_dir) is {where} {name} {str(path)!r}: the "
                                 "captures would make a folder where that file is "
                                 "written at the end of the run. Pass a capture folder beside the plan, e.g. "
                                 f"{plan.parent / 'qkv'}")


def another_report(out, folder) -> str:
    """What in ``folder`` is a report of another output than the plan ``out`` ("" when nothing is): report files
    beside no calibration.json (``dit-accel eval``'s, say), or a calibration.json of a plan at another path whose
    content ``out`` does not hold. A rerun with the same ``--out`` replaces its own report, as it replaces the plan."""
    folder = Path(folder)
    held = [name for name in (*OUTPUT_FILES, "results.json") if (folder / name).is_file()]
    if not held:
        return ""
    try:
        record = json.loads((folder / "calibration.json").read_text(encoding="utf-8"))
        owner = Path(str(record["plan_path"]))
    except (OSError, ValueError, TypeError, KeyError):
        return f"{', '.join(held)} of another run (not a calibration of {out})"
    if owner.absolute() == Path(out).absolute():
        return ""
    try:
        if SparsePlan.load(out).content_hash() == record.get("plan_sha256"):
            return ""  # (the same plan, its folder moved or the run started from another working folder)
    except (OSError, ValueError):
        pass
    return f"the report of another plan, {owner} ({', '.join(held)})"


def recover_outputs(out, report_dir) -> None:
    """Finish a killed run's committed outputs, then sweep the temporaries dead runs left beside them."""
    from ..atomic_files import commit_journal, recover

    out, report_dir = Path(out), Path(report_dir)
    recover(commit_journal(out), [out.parent, report_dir])
