"""Launch a test worker under torchrun on CPU processes (gloo), as a user would, with a native crash's trace."""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, target, *args, timeout: int = 600) -> None:
    """Run ``target`` (a worker script's path, or ``"-m package.module"``) in ``nproc`` ranks; fail with the ranks'
    log unless every rank exits 0."""
    # gloo on CPU processes, also on a GPU machine (two ranks on one GPU would collide)
    # PYTHONFAULTHANDLER: a rank that dies on a signal prints its Python stack, so a native crash has a trace.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONFAULTHANDLER": "1"}
    target = str(target)
    # --standalone: a free rendezvous port per launch (parallel test workers each start torchrun)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--tee", "3",
           *(target.split() if target.startswith("-m ") else [target]), *map(str, args)]
    for launch in (1, 2, 3):
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        log = res.stdout[-6000:] + res.stderr[-6000:]
        if res.returncode == 0 or launch == 3 or not killed_by_signal(res.stderr):
            break
        # A rank killed by the OS or a native crash inside gloo's all-gather (CI: SIGSEGV, SIGABRT, and once glibc's
        # "malloc(): unaligned tcache chunk detected", in both launches of one run, each in the ring gather of the
        # FLUX ring2 scenario; never reproduced alone, in 20 runs, nor beside two busy processes). Up to three
        # launches, the crashed rank's own output kept in a warning; a Python error in a rank, or a third crash, fails.
        warnings.warn(f"torchrun {target}: a rank died on a signal; launched again. Its output:\n"
                      f"{crashed_rank_output(res.stdout + res.stderr)}\nThe end of the log:\n{log}", stacklevel=2)
    assert res.returncode == 0, log


def killed_by_signal(stderr: str) -> bool:
    """torchrun's failure report: the first rank to fail (its "Root Cause") died on a signal, not a Python error
    (the other ranks then fail on the closed connection, which is a consequence)."""
    code = re.search(r"exitcode\s*:\s*(-?\d+)", _root_cause(stderr))
    return code is not None and int(code.group(1)) < 0


def crashed_rank_output(output: str, lines: int = 80) -> str:
    """The last ``lines`` lines the root-cause rank printed (``--tee`` prefixes them with ``[default<rank>]``): its
    faulthandler stack, which the end of the whole log often lacks."""
    rank = re.search(r"local_rank\s*:\s*(\d+)", _root_cause(output))
    if rank is None:
        return "(no root-cause rank in the log)"
    own = [line for line in output.splitlines() if line.startswith(f"[default{rank.group(1)}]")]
    return "\n".join(own[-lines:]) or f"(rank {rank.group(1)} printed nothing)"


def _root_cause(report: str) -> str:
    """The "Root Cause" entry of torchrun's failure report: the first rank to fail."""
    return report.rpartition("Root Cause")[2]
