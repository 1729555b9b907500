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
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..atomic_files import atomic_write_json
from .compile import TARGET_ARCHS, aot_source, compile_for_target, map_in_workers, shipped_kernel_configs
from .occupancy import occupancy  # shared with the persistent launcher (a leaf module: no import cycle)

__all__ = ["Instruction", "Loop", "parse_sass", "find_loops", "classify", "CLASSES", "occupancy", "ptxas_report",
           "parse_ptxas_log", "resource_usage", "disassemble", "analyze", "analyze_many", "compile_shipped", "report",
           "paired",
           "loop_ratios", "sass_table", "partial_block_cost", "tile_cycles", "clean", "rank", "search", "search_jobs",
           "loop_names", "ttgir_facts", "family_of", "main_loop", "main_ring", "loop_warps", "MAIN_LOOP", "MASKED_LOOP", "ONE_LOOP", "ANALYSIS_VERSION"]

#: Bump when the analysis changes, so cached results are recomputed.
ANALYSIS_VERSION = 10

# ----------------------------------------------------------------------------- instruction classes
#: Instruction classes of the per-tile counts, in report order.
CLASSES = ("tensor", "global", "shared", "local", "mufu", "shfl", "barrier", "int", "fp", "branch", "other")

_CLASS_OF = {
    **dict.fromkeys(("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "QGMMA", "BMMA", "UTCHMMA", "UTCQMMA", "UTCMMA",
                     "HMNMX2"), "tensor"),
    **dict.fromkeys(("LDG", "STG", "LDGSTS", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UBLKPF", "LD", "ST", "RED",
                     "ATOM", "ATOMG", "REDG", "UTMACCTL", "CCTL", "LDGMC"), "global"),
    **dict.fromkeys(("LDS", "STS", "LDSM", "STSM", "ATOMS", "LDSU", "UTMREDG"), "shared"),
    **dict.fromkeys(("LDL", "STL"), "local"),
    "MUFU": "mufu",
    "SHFL": "shfl",
    **dict.fromkeys(("BAR", "BARRIER", "DEPBAR", "WARPGROUP", "SYNCS", "MEMBAR", "FENCE", "LDGDEPBAR", "ARRIVES",
                     "WARPSYNC", "ERRBAR", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "ELECT"), "barrier"),
    **dict.fromkeys(("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "BREAK", "YIELD", "KILL",
                     "BPT", "ACQBULK"), "branch"),
    **dict.fromkeys(("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK", "F2F", "F2FP", "F2I", "I2F",
                     "I2FP", "HADD2", "HMUL2", "HFMA2", "HSET2", "HSETP2", "FSWZADD", "FRND", "DADD", "DMUL", "DFMA",
                     "FMUL2", "FADD2", "FFMA2", "F2IP", "HMNMX2"), "fp"),
}
_INT_OPS = {"IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IABS", "SEL", "MOV", "PRMT",
            "S2R", "S2UR", "CS2R", "R2UR", "LDC", "IMNMX", "VIADD", "VIMNMX", "VIADDMNMX", "BMSK", "POPC", "FLO",
            "BREV", "PLOP3", "P2R", "R2P", "VOTE", "VOTEU", "IDP", "IMUL", "SGXT", "I2I", "I2IP", "MATCH",
            "REDUX", "IMNMX", "FMNMX3", "NOP_INT"}


def classify(opcode: str) -> str:
    """Class of a SASS opcode (``"HGMMA.64x64x16.F32.BF16"`` -> ``"tensor"``); see :data:`CLASSES`."""
    base = opcode.split(".", 1)[0]
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base in _INT_OPS or (base.startswith("U") and base[1:] in _INT_OPS | {"LDC", "MOV", "SEL", "LOP3", "IADD3",
                                                                              "SHF", "LEA", "IMAD", "ISETP",
                                                                              "FLO", "POPC", "PRMT", "BREV",
                                                                              "SGXT", "BMSK", "P2UR", "R2UR"}):
        return "int"
    if base in ("R2UR", "UP2UR", "P2UR", "S2UR", "ULDC", "UMOV", "USHF", "UIADD3", "ULEA", "ULOP3", "UISETP",
                "UIMAD", "USEL", "UPRMT", "UFLO", "UPOPC", "UBREV", "USGXT", "UBMSK", "UPLOP3", "VOTEU"):
        return "int"
    if base == "NOP":
        return "other"
    return "other"


# ----------------------------------------------------------------------------- SASS parsing
@dataclass
class Instruction:
    """One SASS instruction: address, guard predicate, opcode, operand text, source line chain."""

    addr: int
    pred: Optional[str]
    opcode: str
    operands: str
    lines: Tuple[Tuple[str, int], ...] = ()  # ((file, line), ...) innermost first, then the inlining call sites
    target: Optional[str] = None  # branch target label

    @property
    def cls(self) -> str:
        return classify(self.opcode)

    @property
    def is_branch(self) -> bool:
        return self.opcode.split(".", 1)[0] in ("BRA", "BRX", "JMP", "JMX")

    @property
    def conditional(self) -> bool:
        """A guarded branch (``@P0 BRA``, or ``BRA P1, target``): it may fall through."""
        if self.pred is not None and self.pred not in ("PT",):
            return True
        return bool(re.match(r"\s*!?U?P\d", self.operands))


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@(!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L_x_\d+|[A-Za-z_$.][\w$.]*):\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(.*)$')
_INLINED = re.compile(r'inlined at "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> Tuple[List[Instruction], Dict[str, int]]:
    """Parse ``nvdisasm -c -g`` output: ``(instructions in address order, {label: address})``.

    Only the first function of the text is read (a Triton cubin holds one kernel).
    """
    instrs: List[Instruction] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    lines: Tuple[Tuple[str, int], ...] = ()
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if m:
            chain = [(m.group(1), int(m.group(2)))] + [(f, int(n)) for f, n in _INLINED.findall(m.group(3))]
            lines = tuple(chain)
            continue
        m = _LABEL.match(raw.strip())
        if m:  # labels name the next instruction's address
            pending.append(m.group(1))
            continue
        m = _INSTR.match(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        opcode, operands = m.group(3), m.group(4)
        tm = _TARGET.search(operands)
        instrs.append(Instruction(addr, m.group(2), opcode, operands, lines, tm.group(1) if tm else None))
    return instrs, labels


@dataclass
class Loop:
    """A loop of the SASS: instructions from ``head`` to the back edge at ``end`` (addresses)."""

    head: int
    end: int
    max_path: int  # instructions per iteration on the longest path head -> back edge
    min_path: int  # ... on the shortest path
    classes: Dict[str, int]  # class counts on the longest path
    min_classes: Dict[str, int]  # class counts on the shortest path
    name: Optional[str] = None  # from the ``# loop: NAME`` comment of its ``for`` statement
    source_line: Optional[int] = None
    votes: int = 0  # instructions that named it

    def as_dict(self) -> dict:
        return {"name": self.name, "line": self.source_line, "instructions": self.max_path,
                "min_path": self.min_path, "classes": dict(self.classes), "min_classes": dict(self.min_classes)}


def _paths(body: List[Instruction], labels: Dict[str, int], end: int):
    """Longest and shortest instruction paths from the first instruction of ``body`` to the back edge."""
    index = {ins.addr: i for i, ins in enumerate(body)}
    n = len(body)
    # best[i] = (longest, shortest, longest counter, shortest counter) from instruction i to the back edge.
    best: List[Optional[tuple]] = [None] * (n + 1)
    for i in range(n - 1, -1, -1):
        ins = body[i]
        succ = []
        if ins.addr == end:
            succ_tail = [(0, 0, Counter(), Counter())]
        else:
            succ_tail = []
            base = ins.opcode.split(".", 1)[0]
            falls = not ((ins.is_branch and not ins.conditional) or (base == "EXIT" and not ins.conditional))
            if ins.is_branch and ins.target in labels:
                t = labels[ins.target]
                if t in index and index[t] > i:
                    succ.append(index[t])
            if falls and i + 1 < n:
                succ.append(i + 1)
            succ_tail = [best[j] for j in succ if best[j] is not None]
        if not succ_tail:
            best[i] = None
            continue
        longest = max(succ_tail, key=lambda r: r[0])
        shortest = min(succ_tail, key=lambda r: r[1])
        best[i] = (longest[0] + 1, shortest[1] + 1, longest[2] + Counter({ins.cls: 1}),
                   shortest[3] + Counter({ins.cls: 1}))
    return best[0]


def find_loops(instrs: List[Instruction], labels: Dict[str, int]) -> List[Loop]:
    """Every loop (backward branch) of a parsed kernel, in address order, with per-iteration counts."""
    loops = []
    for ins in instrs:
        if not ins.is_branch or ins.target not in labels:
            continue
        head = labels[ins.target]
        if head > ins.addr:
            continue
        body = [x for x in instrs if head <= x.addr <= ins.addr]
        res = _paths(body, labels, ins.addr)
        if res is None:
            continue
        longest, shortest, cl, cs = res
        loops.append(Loop(head, ins.addr, longest, shortest, dict(cl), dict(cs)))
    return sorted(loops, key=lambda lp: lp.head)


def loop_names(source_file: str) -> List[Tuple[int, int, str]]:
    """``(first line, last line, name)`` of every ``for`` statement marked ``# loop: NAME`` in a file."""
    text = Path(source_file).read_text()
    src_lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.For):
            m = re.search(r"#\s*loop:\s*([\w-]+)", src_lines[node.lineno - 1])
            if m:
                out.append((node.lineno, node.end_lineno, m.group(1)))
    return out


def _same_source(path: str, kernel_file: str) -> bool:
    """Whether a line-info path names ``kernel_file``. Triton's cache is shared between checkouts and
    keys cubins by source, not path, so a cached cubin may name another checkout's copy of the file:
    compare the package-relative tail (``kernels/block_sparse/triton.py``)."""
    return Path(path).parts[-3:] == Path(kernel_file).parts[-3:]


def _name_loops(loops: List[Loop], instrs: List[Instruction], kernel_file: str) -> None:
    """Name each loop after the marked ``for`` statement that holds most of its instructions."""
    marked = loop_names(kernel_file)
    for lp in loops:
        votes: Counter = Counter()
        # Instructions of a nested loop vote for that loop only (a persistent kernel's loop over work
        # items holds the loop over tiles; a tile loop holds its mbarrier wait loops, which go unnamed
        # where the tile loop's own instructions outvote them, and then lose the name to it).
        inner = [(x.head, x.end) for x in loops if x is not lp and lp.head <= x.head and x.end <= lp.end
                 and (x.head, x.end) != (lp.head, lp.end)]
        for ins in instrs:
            if lp.head <= ins.addr <= lp.end and not any(a <= ins.addr <= e for a, e in inner):
                # Frames in the kernel's file, innermost first: a helper from another file counts at its
                # call site; one in this file at its own line when that is inside a marked loop (a
                # persistent kernel's per-item function), else at its call site.
                frames = [ln for f, ln in ins.lines if _same_source(f, kernel_file)] if ins.lines else []
                for line in frames:
                    inside = [(a, b, name) for a, b, name in marked if a <= line <= b]
                    if inside:
                        a, b, name = max(inside, key=lambda t: t[0])  # the innermost marked loop
                        votes[(name, a)] += 1
                        break
        if votes:
            (lp.name, lp.source_line), lp.votes = votes.most_common(1)[0]


# ----------------------------------------------------------------------------- tools
@functools.lru_cache(maxsize=None)
def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found at {path}: triton's wheel ships it on Linux x86-64")
    return str(path)


def _ptxas(arch: int) -> str:
    # The same ptxas triton compiles with (it switches binaries at sm_90).
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -g`` of a cubin: SASS of the code sections with source line comments."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        # -ndf: no dataflow analysis (direct branches keep their labels; a third faster).
        return subprocess.run([_tool("nvdisasm"), "-c", "-g", "-ndf", f.name], check=True, capture_output=True,
                              text=True).stdout


_SETMAXREG = re.compile(r"USETMAXREG\.\w+\.\w+\s+(?:U?P\d+,\s*)?0x([0-9a-f]+)")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """``cuobjdump -res-usage``: ``{"registers", "stack", "shared_static", "local"}`` (bytes)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared_static": int(m.group(3)),
            "local": int(m.group(4))}


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ADVISORY = re.compile(r"\((C\d{4})\)\s*(.*)")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack, spills and advisories (``[{"code": "C7515", "message": ...}]``) of a ``ptxas -v`` log."""
    out = {"stack": None, "spill_stores": None, "spill_loads": None, "ptxas_registers": None, "warnings": []}
    m = _SPILLS.search(log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(x) for x in m.groups())
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["ptxas_registers"] = int(m.group(1))
    for line in log.splitlines():
        a = _ADVISORY.search(line)
        if a:
            out["warnings"].append({"code": a.group(1), "message": a.group(2).strip()[:300]})
        elif "warning" in line.lower():
            out["warnings"].append({"code": "warning", "message": line.strip()[:300]})
    return out


def ptxas_report(ptx: str, arch: int, fp_fusion: bool = True) -> dict:
    """Re-run ``ptxas -v`` on ``ptx`` with triton's flags and parse its log (see :func:`parse_ptxas_log`)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [_ptxas(arch), "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    return parse_ptxas_log(res.stderr + res.stdout)


# ----------------------------------------------------------------------------- one configuration
_RING = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x(\d+)x(bf16|f16|f32)")


def ttgir_facts(ttgir: str, ptx: str = "") -> dict:
    """What the TTGIR says about pipelining and scheduling (no SASS needed):

    ``rings``: ``[depth, rows, cols, dtype]`` of every multi-buffered tile allocation of the
    pipeliner (``ttg.local_alloc`` of ``depth x rows x cols``: the K / V rings of a forward kernel);
    ``ring``: the shallowest of them (0 without any); ``persistent``: the kernel reads the number
    of programs (``tt.get_num_programs``: it strides over work items); ``tma_loads``: the TMA copies
    into shared memory (``ttng.async_tma_copy_global_to_local``, from host or in-kernel descriptors);
    ``warp_specialized``: ``ttg.warp_specialize`` partitions, and ``setmaxnreg`` (PTX) whether producer
    and consumer warps re-balance registers.
    """
    rings = [[int(a), int(b), int(c), t] for a, b, c, t in _RING.findall(ttgir)]
    return {"rings": rings, "ring": min((r[0] for r in rings), default=0),
            "persistent": "tt.get_num_programs" in ttgir, "warp_specialized": "ttg.warp_specialize" in ttgir,
            "tma_loads": ttgir.count("ttng.async_tma_copy_global_to_local"),
            "setmaxnreg": "setmaxnreg" in ptx}


def family_of(cfg) -> str:
    """``"block_sparse"``, ``"sla"`` or ``"dense"`` from a configuration's class."""
    name = type(cfg).__name__
    return {"KernelConfig": "block_sparse", "SLAKernelConfig": "sla", "DenseConfig": "dense"}.get(name, name)


#: A loop that runs two kinds of tile, the second behind a branch (the block-sparse forward's
#: ``tiles``: full tiles skip the mask code): its shortest path per iteration is reported as the
#: first name, its longest as the second, so both compare like two separate loops would.
ONE_LOOP = {"tiles": ("full", "partial")}
#: The loop whose per-tile instruction count is compared with the dense kernel's ``full`` loop.
MAIN_LOOP = {"block_sparse": "full", "sla": "critical", "dense": "full"}
#: The loop of masked tiles, compared with the main loop (partial-block cost).
MASKED_LOOP = {"block_sparse": "partial", "sla": "ragged", "dense": "tail"}


def main_loop(row: dict) -> str:
    """The name of a row's main loop (SLA's linear-branch dK/dV kernel has only linear loops)."""
    return "linear" if row.get("kernel") == "bwd_dkdv_lin" else MAIN_LOOP.get(row.get("family"), "full")


def _cache_dir() -> Path:
    root = os.environ.get("DIT_ACCEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dit_accel")
    return Path(root) / "sass"


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """Hash of every ``@triton.jit`` function of the kernel modules and of where it starts: an edit to
    a kernel, or host code that moves one, invalidates every cached analysis (the analyses record
    source line numbers)."""
    here = Path(__file__).parent
    parts = []
    for name in ("dense/tiles.py", "dense/triton.py", "block_sparse/triton.py", "sla/triton.py"):
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


def _named_loops(text: str, kernel_file: str) -> Dict[str, dict]:
    """``{name: loop dict}`` of the marked loops; when a name repeats (an mbarrier wait loop inside
    a loop maps to the same ``for``; so may a persistent kernel's loop over work items, through the
    pipeline prologue of its tile loop), see :func:`_keeps_name`."""
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
        out[name] = {**lp.as_dict(), "sync_global_loads": bases.count("LDG"), "sync_global_load_lines": lines,
                     "async_copies": bases.count("LDGSTS") + bases.count("UTMALDG")}
    for name, (short, long) in ONE_LOOP.items():
        if name in out and short not in out and long not in out:
            lp = out[name]
            out[short] = {**lp, "name": short, "instructions": lp["min_path"], "classes": lp["min_classes"]}
            out[long] = {**lp, "name": long}
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
            row["loops"] = _named_loops(text, kernel_file)
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
        except OSError:
            pass
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


# ----------------------------------------------------------------------------- cost model
#: Dense tensor-core FLOPs per clock per SM for fp16/bf16 inputs (fp32 accumulation), from the
#: parts' datasheets: A100 312 TFLOPS / 108 SMs / 1.41 GHz, L40S 362 / 142 / 2.52,
#: H100 SXM 989 / 132 / 1.83. tf32 (fp32 inputs) runs at half that.
TENSOR_FLOPS_PER_CLK = {80: 2048, 89: 1024, 90: 4096}
#: MUFU (exp2, rcp) results per clock per SM.
MUFU_PER_CLK = 16
#: Warp instructions an SM issues per clock (4 schedulers, one each).
ISSUE_PER_CLK = 4
_DOTS = {"fwd": 2, "bwd_dq": 3, "bwd_dkdv": 4, "bwd_dkdv_lin": 6}  # tensor-core products per tile


def loop_warps(row: dict) -> int:
    """Warps that run a row's tile loop: ``num_warps``, or in a warp-specialized kernel its consumer
    warp groups (the CTA's warps less the ``num_warps`` of the producer's default partition)."""
    if row.get("warp_specialized") and row.get("cta_warps", 0) > row["num_warps"]:
        return row["cta_warps"] - row["num_warps"]
    return row["num_warps"]


def tile_cycles(row: dict, loop: Optional[str] = None) -> Optional[dict]:
    """Modelled SM cycles per tile of a loop: the issue port, the tensor cores and the MUFU in parallel.

    ``issue = instructions * warps / 4``, ``tensor = 2 * dots * BM * BN * D / flops-per-clock``,
    ``mufu = MUFU instructions * warps * 32 / 16``; the tile costs the largest (a roofline of
    the three, assuming enough resident warps to overlap them). A model, not a measurement.
    """
    loop = loop or main_loop(row)
    lp = (row.get("loops") or {}).get(loop)
    if lp is None:
        return None
    arch = 90 if row["arch"] >= 90 else (80 if row["arch"] == 80 else 89)
    bm, bn = row["tile"]
    flops = 2 * _DOTS.get(row["kernel"], 2) * bm * bn * row["block_d"]
    rate = TENSOR_FLOPS_PER_CLK[arch] / (2 if "float32" in row["dtype"] else 1)
    warps = loop_warps(row)
    parts = {"issue": lp["instructions"] * warps / ISSUE_PER_CLK, "tensor": flops / rate,
             "mufu": lp["classes"].get("mufu", 0) * warps * 32 / MUFU_PER_CLK}
    bound = max(parts, key=parts.get)
    return {**parts, "cycles": parts[bound], "bound": bound, "per_pair": parts[bound] / (bm * bn)}


def clean(row: dict) -> bool:
    """Compiled, fits shared memory, no spill (stack / local / spill bytes) and no serialised wgmma."""
    return (row.get("error") is None and row["shared"] <= row["limit"] and not row["stack"] and not row["local"]
            and not row["spill_stores"] and not row["c7515"])


#: A masked (partial) tile may cost at most this many full tiles (the tests' bound).
PARTIAL_LIMIT = 1.5


def _partial_ok(row: dict) -> bool:
    loops = row.get("loops") or {}
    main, masked = loops.get(main_loop(row)), loops.get(MASKED_LOOP.get(row["family"], ""))
    return row["family"] != "block_sparse" or not (main and masked) or \
        masked["instructions"] <= PARTIAL_LIMIT * main["instructions"]


def rank(rows: Sequence[dict], loop: Optional[str] = None) -> List[dict]:
    """Clean candidates whose partial tiles cost at most :data:`PARTIAL_LIMIT` full ones first, by
    modelled cycles per score element of the main loop (within 2%),
    then by the owned tile's rows (each streamed K/V or Q/dO tile serves that many rows: fewer
    global loads per score element), by resident warps per SM and by stages (both hide memory
    latency, which the model does not see), then by registers."""
    def key(r):
        cyc = tile_cycles(r, loop) if r.get("error") is None else None
        if cyc is None:
            return (True, float("inf"), 0, 0, 0, 0)
        owned = r["tile"][1] if r["kernel"].startswith("bwd_dkdv") else r["tile"][0]
        return (not (clean(r) and _partial_ok(r)), round(math.log(cyc["per_pair"]) / math.log(1.02)), -owned,
                -r["occupancy"]["warps"], -min(r["num_stages"], 3), r["registers"])

    return sorted(rows, key=key)


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
    (key tiles; query tiles for dK/dV), so an SLA forward's linear-loop half tiles (rings of their own)
    do not hide its critical loop's K / V ring; 0 without any."""
    rows = row["tile"][0] if row["kernel"].startswith("bwd_dkdv") else row["tile"][1]
    return min((depth for depth, n, *_ in row.get("rings") or [] if n == rows), default=row.get("ring") or 0)


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
