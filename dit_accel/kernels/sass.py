"""Static GPU inspection: what the GPU would execute, read from the compiled cubin on a CPU machine.

For every shipped kernel configuration (:func:`dit_accel.kernels.shipped_kernel_configs`)
and target (sm_80, sm_89, sm_90) this module compiles the kernel with Triton, then reads
the artefact with the tools Triton's wheel ships:

- ``ptxas -v`` (the log of the very compile, or a re-run on the PTX): registers, stack
  frame, spill stores / loads, and performance advisories such as C7515 (wgmma
  serialised);
- ``cuobjdump -res-usage``: registers, STACK and LOCAL bytes, static shared memory;
- ``nvdisasm -c -g``: SASS with source lines. Loops are backward branches; each loop is
  named by the ``# loop: NAME`` comment on its ``for`` statement, and its body is
  counted per iteration (the longest and shortest path from the loop head to the back
  edge), by instruction class.

Beside each configuration stands the in-repo dense kernel (:mod:`dit_accel.kernels.dense`)
compiled with the same tile, warps, stages, dtype and target, so the report says how
many instructions per tile a sparse kernel spends beyond dense attention.

Public functions: :func:`analyze` (one config, this process), :func:`analyze_many` (many,
in parallel worker processes, cached on disk), :func:`report` / :func:`paired` (rows with
their dense twins: ``dit-accel bench sass``), :func:`sass_table`, :func:`tile_cycles` (an
issue / tensor / MUFU roofline per tile), :func:`search` (rank candidate launch
configurations), :func:`partial_block_cost` (a cost model for tile choice) and the parsing
helpers :func:`parse_sass`, :func:`find_loops`, :func:`classify`, :func:`occupancy`.

Example::

    from dit_accel.kernels.sass import report, sass_table
    rows = report(archs=(90,), families=("block_sparse",), kernels=("fwd",))
    print(sass_table(rows))
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..atomic_files import atomic_write_json, cache_root, warn_unwritable_cache
from .compile import TARGET_ARCHS, aot_source, compile_for_target, map_in_workers, shipped_kernel_configs
from .occupancy import occupancy  # shared with the persistent launcher (a leaf module: no import cycle)
from .sass_parse import (_SETMAXREG, CLASSES, Instruction, Loop, _name_loops, _same_source, classify, disassemble,
                         find_loops, loop_names, parse_ptxas_log, parse_sass, ptxas_report, resource_usage,
                         shallowest_ring, ttgir_facts)
from .sass_rules import (MAIN_LOOP, MASKED_LOOP, PARTIAL_LIMIT, clean, loop_warps, main_loop, rank,  # noqa: F401
                         tile_cycles)

__all__ = ["Instruction", "Loop", "parse_sass", "find_loops", "classify", "CLASSES", "occupancy", "ptxas_report",
           "parse_ptxas_log", "resource_usage", "disassemble", "analyze", "analyze_many", "compile_shipped", "report",
           "paired",
           "loop_ratios", "sass_table", "partial_block_cost", "tile_cycles", "clean", "rank", "search", "search_jobs",
           "loop_names", "ttgir_facts", "family_of", "main_loop", "main_ring", "loop_warps", "MAIN_LOOP", "MASKED_LOOP", "ONE_LOOP", "ANALYSIS_VERSION"]

#: Bump when the analysis changes, so cached results are recomputed.
ANALYSIS_VERSION = 15


# ----------------------------------------------------------------------------- one configuration
def family_of(cfg) -> str:
    """``"block_sparse"``, ``"sla"`` or ``"dense"`` from a configuration's class."""
    name = type(cfg).__name__
    return {"KernelConfig": "block_sparse", "SLAKernelConfig": "sla", "DenseConfig": "dense"}.get(name, name)


#: A loop that runs two kinds of tile, the second behind a branch (the block-sparse forward's
#: ``tiles``: full tiles skip the mask code): its shortest path per iteration is reported as the
#: first name, its longest as the second, so both compare like two separate loops would.
ONE_LOOP = {"tiles": ("full", "partial")}


def _cache_dir() -> Path:
    return cache_root() / "sass"


def kernel_modules() -> List[str]:
    """The modules under ``dit_accel/kernels`` that define ``@triton.jit`` functions, helpers included (paths
    relative to it): what :func:`_source_digest` reads."""
    here = Path(__file__).parent
    return [path.relative_to(here).as_posix() for path in sorted(here.rglob("*.py"))
            if "@triton.jit" in path.read_text()]


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """Hash of every ``@triton.jit`` function of the kernel modules and of where it starts: an edit to
    a kernel, or host code that moves one, invalidates every cached analysis (the analyses record
    source line numbers)."""
    here = Path(__file__).parent
    parts = []
    for name in kernel_modules():
        text = (here / name).read_text()
        for node in ast.parse(text).body:
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                parts.append(f"{name}:{node.lineno}:{ast.get_source_segment(text, node)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _ptxas_version(arch: int) -> str:
    """Path and version of the ptxas triton uses for ``sm_<arch>`` ("" when it cannot be asked)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch)
        return f"{tool.path}:{tool.version}"
    except Exception:  # no nvidia backend: the compile itself will report it
        return ""


def _cache_key(cfg, arch: int) -> str:
    import triton

    _, signature, constexprs, attrs = aot_source(cfg)  # argument types are not in the kernel source
    parts = [_source_digest(), family_of(cfg), repr(cfg), repr(sorted(signature.items())),
             repr(sorted(constexprs.items())), repr(sorted(attrs.items())), str(arch), triton.__version__,
             _ptxas_version(int(arch)), str(ANALYSIS_VERSION)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _compile_with_log(cfg, arch: int):
    """Compile ``cfg`` and return ``(compiled kernel, ptxas -v log or "" on a triton cache hit)``."""
    import contextlib
    import io

    from triton import knobs


    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # triton prints the log of its own ptxas run
    try:
        with contextlib.redirect_stdout(buf):
            ck = compile_for_target(cfg, arch)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    return ck, buf.getvalue()


def _keeps_name(lp: Loop, other: Loop) -> bool:
    """Of two loops named after one ``for``: the innermost one with tensor-core instructions (the tile
    loop, not a wait loop inside it nor a loop over work items around it); without any, the longest."""
    mma, other_mma = lp.classes.get("tensor", 0) > 0, other.classes.get("tensor", 0) > 0
    if mma != other_mma:
        return mma
    if mma:
        return lp.end - lp.head < other.end - other.head
    return lp.max_path > other.max_path


def base_is(ins: Instruction, base: str) -> bool:
    return ins.opcode.split(".", 1)[0] == base


def _bit_mask_code() -> Callable[[Instruction], bool]:
    """Whether an instruction comes from the bit-mask code of the block-sparse forward's one loop
    (:func:`.block_sparse.lengths.bit_masked`, with what it inlines)."""
    import inspect

    from .block_sparse.lengths import bit_masked

    fn = bit_masked.fn
    src, first = inspect.getsourcelines(fn)
    # the body only: ptxas puts code of the function above on the decorator and def lines
    skip = next(i for i, line in enumerate(src) if line.lstrip().startswith("def ")) + 1
    path, lines = fn.__code__.co_filename, range(first + skip, first + len(src))
    return lambda ins: any(_same_source(f, path) and ln in lines for f, ln in ins.lines)


def _fewest_flagged_longest(body: List[Instruction], labels: Dict[str, int], end: int,
                            flagged: Callable[[Instruction], bool]) -> Optional[int]:
    """Instructions on the longest path from the loop head to its back edge ``end`` among the paths through
    the fewest ``flagged`` instructions (ptxas may leave a few of a branch's instructions past the join,
    on every path; the path that skips the branch itself avoids the rest)."""
    index = {ins.addr: i for i, ins in enumerate(body)}
    best: List[Optional[Tuple[int, int]]] = [None] * len(body)  # (score, instructions) to the back edge
    for i in range(len(body) - 1, -1, -1):
        ins = body[i]
        if ins.addr == end:
            tails = [(0, 0)]
        else:
            nxt = []
            if ins.is_branch and ins.target in labels and index.get(labels[ins.target], -1) > i:
                nxt.append(index[labels[ins.target]])
            base = ins.opcode.split(".", 1)[0]
            if not ((ins.is_branch or base == "EXIT") and not ins.conditional) and i + 1 < len(body):
                nxt.append(i + 1)
            tails = [best[j] for j in nxt if best[j] is not None]
        if tails:
            score, count = max(tails)
            best[i] = (score + 1 - 10 ** 6 * flagged(ins), count + 1)
    return best[0][1] if best and best[0] is not None else None


def _named_loops(text: str, kernel_file: str, lengths: bool = False) -> Dict[str, dict]:
    """``{name: loop dict}`` of the marked loops; when a name repeats (an mbarrier wait loop inside
    a loop maps to the same ``for``; so may a persistent kernel's loop over work items, through the
    pipeline prologue of its tile loop), see :func:`_keeps_name`. ``lengths`` (a forward with length
    tiles): the one loop's longest path outside its bit-mask code is reported as ``length``."""
    instrs, labels = parse_sass(text)
    loops = find_loops(instrs, labels)
    _name_loops(loops, instrs, kernel_file)
    named: Dict[str, Loop] = {}
    for lp in loops:
        if lp.name and (lp.name not in named or _keeps_name(lp, named[lp.name])):
            named[lp.name] = lp
    out = {}
    for name, lp in named.items():
        body = [ins for ins in instrs if lp.head <= ins.addr <= lp.end]
        bases = [ins.opcode.split(".", 1)[0] for ins in body]
        # A synchronous global load (LDG) in the loop stalls its iteration on memory; the pipeliner
        # turns loads it can move iterations ahead (block indices, K/V) into cp.async (LDGSTS) or TMA.
        # Each LDG's source line (innermost frame in the kernel's file) says which load it is.
        lines = sorted({here[0] for ins, base in zip(body, bases) if base == "LDG"
                        for here in [[ln for f, ln in ins.lines if _same_source(f, kernel_file)]] if here})
        # Products per iteration: on sm_90 a tl.dot is a group of HGMMA instructions whose last one waits on the
        # group's barrier (gsb0); mma.sync products (HMMA, sm_80, or sm_90 tiles under 64 rows) have no groups,
        # their count of m16n8k16 instructions says how many (ptxas's source lines are not exact enough).
        groups = sum(1 for ins in body if base_is(ins, "HGMMA") and "gsb0" in ins.operands)
        hmma = sum(1 for ins in body if base_is(ins, "HMMA"))
        out[name] = {**lp.as_dict(), "sync_global_loads": bases.count("LDG"), "sync_global_load_lines": lines,
                     "async_copies": bases.count("LDGSTS") + bases.count("UTMALDG"), "wgmma_groups": groups,
                     "hmma": hmma}
    for name, (short, long) in ONE_LOOP.items():
        if name in out and short not in out and long not in out:
            lp = out[name]
            out[short] = {**lp, "name": short, "instructions": lp["min_path"], "classes": lp["min_classes"]}
            out[long] = {**lp, "name": long}
    if lengths and "tiles" in named:
        lp = named["tiles"]
        body = [ins for ins in instrs if lp.head <= ins.addr <= lp.end]
        count = _fewest_flagged_longest(body, labels, lp.end, _bit_mask_code())
        if count is not None:
            out["length"] = {**out["tiles"], "name": "length", "instructions": count}
    return out


def analyze(cfg, arch: int, use_cache: bool = True, loops: bool = True) -> dict:
    """Compile ``cfg`` for ``sm_<arch>`` in this process and read the artefact (see the module docstring).

    Returns a JSON-ready dict: ``name``, ``family``, ``kernel``, ``arch``, ``dtype``, ``block_d``,
    ``tile`` (``[block_m, block_n]``), ``num_warps``, ``num_stages``, ``registers``, ``stack``,
    ``local``, ``spill_stores``, ``spill_loads``, ``shared`` (dynamic + static bytes), ``limit``
    (the arch's shared memory per block), ``warnings`` (ptxas advisories, e.g. ``C7515``), ``c7515``,
    ``mma`` / ``wgmma`` (tensor-core instructions in the PTX), ``occupancy``, ``loops``
    (``{name: {"instructions", "min_path", "classes", ...}}``; only with ``loops=True``: the
    disassembly costs about a third of a compile), ``error`` (None when it compiled).
    Results are cached on disk (``$DIT_ACCEL_CACHE``, default ``~/.cache/dit_accel``) by the
    kernel's source hash, configuration, arch and triton version.
    """
    from .block_sparse.configs import shared_memory_limit

    fam = family_of(cfg)
    row = {"name": cfg.name, "family": fam, "kernel": cfg.kernel, "arch": int(arch), "dtype": str(cfg.dtype),
           "block_d": cfg.block_d, "tile": [cfg.block_m, cfg.block_n], "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "limit": shared_memory_limit(arch), "error": None}
    stored = _read_cache(cfg, arch) if use_cache else None
    if stored is not None and ("loops" in stored or not loops or stored.get("error")):
        return {**stored, **row}
    try:
        fn = aot_source(cfg)[0]
        kernel_file = (fn.fn if hasattr(fn, "fn") else fn).__code__.co_filename
        if stored is not None:  # analysed without the SASS loops: only disassemble (triton's cache has the cubin)

            ck = compile_for_target(cfg, arch)
            row.update({k: v for k, v in stored.items() if k not in row})
        else:
            ck, log = _compile_with_log(cfg, arch)
            report = parse_ptxas_log(log) if "registers" in log else ptxas_report(ck.asm["ptx"], arch)
            res = resource_usage(ck.asm["cubin"])
            shared = int(ck.metadata.shared) + res["shared_static"]
            ptx = ck.asm["ptx"]
            row.update(registers=res["registers"], stack=res["stack"], local=res["local"],
                       spill_stores=report["spill_stores"] or 0, spill_loads=report["spill_loads"] or 0,
                       shared=shared, warnings=report["warnings"],
                       c7515=any(w["code"] == "C7515" for w in report["warnings"]),
                       mma="mma" in ptx, wgmma="wgmma" in ptx,
                       # a warp-specialized CTA runs more warps than num_warps (its partitions)
                       cta_warps=int(ck.metadata.num_warps),
                       occupancy=occupancy(arch, res["registers"], shared, int(ck.metadata.num_warps)),
                       **ttgir_facts(ck.asm.get("ttgir", ""), ptx))
        if loops:
            text = disassemble(ck.asm["cubin"])
            row["loops"] = _named_loops(text, kernel_file, getattr(cfg, "lengths", False))
            # Register counts the warp groups move to (USETMAXREG, from PTX setmaxnreg): producer down,
            # consumers up; empty without warp specialization.
            row["setmaxreg"] = sorted({int(x, 16) for x in _SETMAXREG.findall(text)})
    except Exception as exc:  # reported, not raised: callers list every failure
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return row
    if use_cache:
        path = _cache_dir() / f"{_cache_key(cfg, arch)}.json"
        try:
            atomic_write_json(path, row, indent=None)
        except OSError as exc:
            warn_unwritable_cache(path, exc, kept="SASS analyses are not kept and compile again in the next process")
    return row


def _read_cache(cfg, arch: int) -> Optional[dict]:
    """The stored analysis of ``cfg`` on ``sm_<arch>`` (with or without the SASS loops), else None."""
    path = _cache_dir() / f"{_cache_key(cfg, arch)}.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged (UnicodeDecodeError is a ValueError): analysed again
        return None
    return row if isinstance(row, dict) else None


def _cached(cfg, arch: int, loops: bool) -> Optional[dict]:
    """The stored analysis of ``cfg`` on ``sm_<arch>`` when it has what is asked (the SASS loops), else None."""
    cached = _read_cache(cfg, arch)
    return cached if cached is not None and ("loops" in cached or not loops or cached.get("error")) else None


def _analyze_job(job) -> dict:
    cfg, arch, loops = job
    return analyze(cfg, arch, loops=loops)


def analyze_many(jobs: Sequence[Tuple[object, int]], workers: int = 2, loops: bool = True,
                 progress: bool = False) -> List[dict]:
    """:func:`analyze` of every ``(config, arch)`` job, in the given order.

    Cached results are read here; the rest compile in ``workers`` spawned processes (triton's
    code generator does not run where the interpreter is active, and ptxas is CPU-bound).
    ``progress``: say on stderr how many compile, with a progress bar over them.
    """

    rows: List[Optional[dict]] = [None] * len(jobs)
    todo = []
    for i, (cfg, arch) in enumerate(jobs):
        if _cached(cfg, arch, loops) is not None:
            rows[i] = analyze(cfg, arch, loops=loops)  # reads the cache
        else:
            todo.append(i)
    if todo:
        work = [(*jobs[i], loops) for i in todo]
        if progress:
            print(f"compiling {len(todo)} kernel configurations ({len(jobs) - len(todo)} cached) in {workers} "
                  "processes; later runs read the cache", file=sys.stderr, flush=True)
        label = "compiling kernels" if progress else None
        for i, row in zip(todo, map_in_workers(_analyze_job, work, workers, progress=label)):
            rows[i] = row
    return rows  # type: ignore[return-value]


# ----------------------------------------------------------------------------- configuration search
def search_jobs(family: str, archs: Sequence[int] = (80, 89, 90), block_ds: Sequence[int] = (64, 128),
                dtypes: Sequence[str] = ("bfloat16",)) -> List[Tuple[object, int]]:
    """Every candidate configuration of a family for each arch, padded head dim and dtype
    (bf16 stands for fp16 too; fp32 and head dim 256 keep their rules and are checked, not searched)."""
    import torch

    jobs: List[Tuple[object, int]] = []
    for arch in archs:
        for name in dtypes:
            dtype = getattr(torch, name)
            for bd in block_ds:
                if family == "block_sparse":
                    from .block_sparse.configs import candidates

                    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
                        jobs += [(c, arch) for c in candidates(kernel, dtype, bd, arch)]
                elif family == "sla":
                    from .sla.configs import SLA_KERNELS
                    from .sla.configs import candidates as sla_candidates

                    for kernel in SLA_KERNELS:
                        for lin in ((True,) if kernel == "bwd_dkdv_lin" else (False, True)):
                            jobs += [(c, arch) for c in sla_candidates(kernel, dtype, bd, lin, arch)]
                else:
                    raise ValueError(f"family must be 'block_sparse' or 'sla'; got {family!r}")
    return jobs


def search(family: str, archs: Sequence[int] = (80, 89, 90), workers: int = 2,
           progress: bool = False) -> Dict[tuple, List[dict]]:
    """Compile every candidate (:func:`search_jobs`) and rank each group with :func:`rank`.

    Groups are ``(arch, kernel, dtype, block_d, has_lin)``; the first row of a group is the
    configuration to ship (for block-sparse, also the best with tiles <= 64 for 64-blocks).
    """
    rows = analyze_many(search_jobs(family, archs), workers, progress=progress)
    groups: Dict[tuple, List[dict]] = {}
    for (cfg, arch), row in zip(search_jobs(family, archs), rows):
        key = (arch, cfg.kernel, str(cfg.dtype), cfg.block_d, getattr(cfg, "has_lin", None))
        groups.setdefault(key, []).append(row)
    return {key: rank(group) for key, group in groups.items()}


# ----------------------------------------------------------------------------- the report
def _select(cfgs: Iterable, kernels, dtypes, block_ds) -> list:
    out = []
    for cfg in cfgs:
        if kernels and cfg.kernel not in kernels:
            continue
        if dtypes and str(cfg.dtype).replace("torch.", "") not in dtypes:
            continue
        if block_ds and cfg.block_d not in block_ds:
            continue
        out.append(cfg)
    return out


def report(archs: Sequence[int] = (80, 89, 90), families: Sequence[str] = ("block_sparse", "sla"),
           kernels: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
           block_ds: Optional[Sequence[int]] = None, dense: bool = True, workers: int = 2,
           progress: bool = False) -> List[dict]:
    """The rows of ``dit-accel bench sass``: each shipped configuration (filtered by kernel names,
    dtype names such as ``"bfloat16"`` and padded head dims), analysed (:func:`analyze`), with
    ``dense`` (the dense kernel's row with the same tile, warps, stages, dtype and target),
    ``ratio`` (main-loop instructions per tile over the dense kernel's) and ``partial_ratio``
    (masked over main loop) added.
    """

    jobs = []
    for arch in archs:
        for family in families:
            jobs += [(cfg, arch) for cfg in _select(shipped_kernel_configs(arch, family), kernels, dtypes, block_ds)]
    return paired(jobs, dense, workers, progress=progress)


def paired(jobs: Sequence[Tuple[object, int]], dense: bool = True, workers: int = 2,
           progress: bool = False) -> List[dict]:
    """:func:`analyze` rows of ``(config, arch)`` jobs, each with ``dense`` (its dense twin's row),
    ``ratio`` and ``partial_ratio`` (:func:`loop_ratios`) added."""
    twins = list(dict.fromkeys((cfg.dense(), arch) for cfg, arch in jobs if dense and cfg.dense() is not None))
    rows = analyze_many(list(jobs) + twins, workers, progress=progress)
    by_job = dict(zip(list(jobs) + twins, rows))
    out = []
    for cfg, arch in jobs:
        row = dict(by_job[(cfg, arch)])
        twin = cfg.dense() if dense else None
        row["dense"] = by_job.get((twin, arch)) if twin is not None else None
        row["ratio"], row["partial_ratio"] = loop_ratios(row)
        out.append(row)
    return out


def loop_ratios(row: dict) -> Tuple[Optional[float], Optional[float]]:
    """``(main loop / dense full loop, masked loop / main loop)`` instructions per tile, None where absent."""
    loops = row.get("loops") or {}
    main = loops.get(main_loop(row))
    masked = loops.get(MASKED_LOOP.get(row["family"], "partial"))
    dense = ((row.get("dense") or {}).get("loops") or {}).get("full")
    ratio = main["instructions"] / dense["instructions"] if main and dense else None
    partial = masked["instructions"] / main["instructions"] if main and masked else None
    return ratio, partial


def main_ring(row: dict) -> int:
    """Depth of a row's main-loop ring: the shallowest multi-buffered tile with the streamed operand's rows
    (key tiles; query tiles for dK/dV); 0 without any. An SLA forward's linear loop streams 64-row tiles too, so
    its rings count; a tile of those rows loaded once per work item (the ws forward's 64-row Q halves) is
    single-buffered and not the ring."""
    rows = row["tile"][0] if row["kernel"].startswith("bwd_dkdv") else row["tile"][1]
    depths = [depth for depth, n, *_ in row.get("rings") or [] if n == rows]
    return shallowest_ring(depths) if depths else row.get("ring") or 0


_TABLE_CLASSES = ("tensor", "global", "shared", "mufu", "shfl", "barrier", "int", "fp", "branch")


def sass_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`report` rows (compile-time analysis; ``per tile`` = main-loop SASS per iteration,
    per warp: in a warp-specialized kernel per consumer warp, each consumer warp group owning 64 query rows;
    ``ring``: the main loop's K/V buffers' depth in the TTGIR (:func:`main_ring`); ``ws regs``: the register counts USETMAXREG sets)."""
    head = ["arch", "config", "regs", "spill B", "smem KB", "CTAs/warps per SM", "ring", "ws regs", "C7515",
            "per tile", "dense", "ratio", "masked/main"] + list(_TABLE_CLASSES)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| sm_{r['arch']} | {r['name']} | compile error: {r['error'][:80]} |")
            continue
        main = (r.get("loops") or {}).get(main_loop(r)) or {}
        dense = ((r.get("dense") or {}).get("loops") or {}).get("full") or {}
        occ = r.get("occupancy") or {}
        spill = max(r["stack"], r["local"], r["spill_stores"])
        cells = [f"sm_{r['arch']}", r["name"], str(r["registers"]), str(spill), f"{r['shared'] / 1024:.0f}",
                 f"{occ.get('ctas', '-')}/{occ.get('warps', '-')}", str(main_ring(r) or "-"),
                 "/".join(map(str, r.get("setmaxreg") or [])) or "-", "yes" if r["c7515"] else "no",
                 str(main.get("instructions", "-")), str(dense.get("instructions", "-")),
                 f"{r['ratio']:.2f}x" if r.get("ratio") else "-",
                 f"{r['partial_ratio']:.2f}x" if r.get("partial_ratio") else "-"]
        cells += [str(main.get("classes", {}).get(c, 0)) for c in _TABLE_CLASSES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def partial_block_cost(arch: int, dtype="bfloat16", head_dim: int = 128, block: int = 128,
                       model: str = "instructions") -> float:
    """Cost of a partial (masked) key tile relative to a full one for the block-sparse forward
    kernel that runs ``dtype`` / ``head_dim`` / ``block``-sized layouts on ``sm_<arch>``.

    ``model="instructions"``: SASS instructions per tile of the partial loop over the full loop
    (the issue-bound view); ``"cycles"``: the ratio of :func:`tile_cycles` (issue, tensor cores
    and MUFU in parallel). A cost model for choosing tiles per pattern: a layout whose partial
    tiles are a fraction ``f`` of its visited tiles costs about ``1 + f * (ratio - 1)`` times
    its full-tile work. Compiles (cached) on first use.
    """
    import torch

    from .block_sparse.configs import select_config

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cfg = select_config("fwd", dt, head_dim, block, block, arch)
    row = analyze_many([(cfg, arch)], workers=1)[0]
    if row.get("error"):
        raise RuntimeError(f"{cfg.name} does not compile for sm_{arch}: {row['error']}")
    if model == "cycles":
        return tile_cycles(row, "partial")["cycles"] / tile_cycles(row, "full")["cycles"]
    if model != "instructions":
        raise ValueError(f"model must be 'instructions' or 'cycles'; got {model!r}")
    return row["loops"]["partial"]["instructions"] / row["loops"]["full"]["instructions"]


def compile_shipped(archs: Sequence[int] = TARGET_ARCHS, workers: int = 2,
                    configs: Optional[Dict[int, list]] = None) -> List[dict]:
    """Compile every shipped configuration for each arch in ``archs``; one dict per (config, arch).

    Each dict is :func:`analyze`'s: ``name``, ``kernel``, ``arch``,
    ``shared`` (bytes), ``limit`` (the arch's shared memory per block), ``mma`` / ``wgmma``
    (tensor-core instructions in the PTX), ``registers``, ``stack``, ``local``,
    ``spill_stores`` / ``spill_loads``, ``warnings`` (ptxas advisories such as C7515),
    ``occupancy`` and ``error`` (None when it compiled; no SASS loops: see
    :func:`paired`). Compiles run
    in ``workers`` spawned processes and land in triton's on-disk cache; the analyses in
    dit_accel's (``$DIT_ACCEL_CACHE``), so a warm run reads files only.
    """
    jobs = [(cfg, a) for a in archs for cfg in (configs[a] if configs else shipped_kernel_configs(a))]
    return analyze_many(jobs, workers, loops=False)
