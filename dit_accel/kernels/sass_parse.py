"""Reading what the GPU would execute: SASS instructions by class, loops (backward branches) and their names, and the
logs of ptxas, cuobjdump and the TTGIR (the parsing half of :mod:`dit_accel.kernels.sass`)."""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .tool_runs import run_tool


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
    """``nvdisasm -c -g`` of a cubin: SASS of the code sections with source line comments (kept on disk by
    :func:`~.tool_runs.run_tool`)."""
    # -ndf: no dataflow analysis (direct branches keep their labels; a third faster).
    return run_tool(_tool("nvdisasm"), ["-c", "-g", "-ndf"], cubin, ".cubin")[1]


_SETMAXREG = re.compile(r"USETMAXREG\.\w+\.\w+\s+(?:U?P\d+,\s*)?0x([0-9a-f]+)")


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """``cuobjdump -res-usage``: ``{"registers", "stack", "shared_static", "local"}`` (bytes)."""
    out = run_tool(_tool("cuobjdump"), ["-res-usage"], cubin, ".cubin")[1]
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

    flags = ["-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", "-o", "{out}"]
    code, out, err = run_tool(_ptxas(arch), flags, ptx.encode(), ".ptx", check=False)
    if code != 0:
        raise RuntimeError(f"ptxas failed: {err[-2000:]}")
    return parse_ptxas_log(err + out)


# ----------------------------------------------------------------------------- TTGIR
_RING = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x(\d+)x(\d+)x(bf16|f16|f32)")


def shallowest_ring(depths) -> int:
    """The shallowest multi-buffered depth in ``depths`` (buffers deeper than 1), else 1 where every buffer is
    single, 0 for none: a tile loaded once per work item sits in a single buffer beside the ring."""
    deep = [d for d in depths if d > 1]
    return min(deep) if deep else min(depths, default=0)


def ttgir_facts(ttgir: str, ptx: str = "") -> dict:
    """What the TTGIR says about pipelining and scheduling (no SASS needed):

    ``rings``: ``[depth, rows, cols, dtype]`` of every multi-buffered tile allocation of the
    pipeliner (``ttg.local_alloc`` of ``depth x rows x cols``: the K / V rings of a forward kernel);
    ``ring``: the shallowest of them deeper than 1 (a tile loaded once per work item, as the ws forward's Q, is
    single-buffered), else 1 where every one is single, 0 without any; ``persistent``: the kernel reads the number
    of programs (``tt.get_num_programs``: it strides over work items); ``tma_loads``: the TMA copies
    into shared memory (``ttng.async_tma_copy_global_to_local``, from host or in-kernel descriptors);
    ``warp_specialized``: ``ttg.warp_specialize`` partitions, and ``setmaxnreg`` (PTX) whether producer
    and consumer warps re-balance registers.
    """
    rings = [[int(a), int(b), int(c), t] for a, b, c, t in _RING.findall(ttgir)]
    return {"rings": rings, "ring": shallowest_ring([r[0] for r in rings]),
            "persistent": "tt.get_num_programs" in ttgir, "warp_specialized": "ttg.warp_specialize" in ttgir,
            "tma_loads": ttgir.count("ttng.async_tma_copy_global_to_local"),
            "setmaxnreg": "setmaxnreg" in ptx}
