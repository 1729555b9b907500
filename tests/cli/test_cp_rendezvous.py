"""``--cp`` started without torchrun (a ``WORLD_SIZE`` left over from SLURM or accelerate): a clear line within a
bounded wait (``DIT_ACCEL_CP_TIMEOUT``), never torch's 30-minute rendezvous or its raw errors; ranks started by hand
with the env:// variables (as SLURM's srun does) still form the group. Each case runs in its own processes, with a
wall-clock limit, so a hang fails the test instead of stalling the suite."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START = ("import sys, torch, torch.distributed as dist\n"
         "from dit_accel.cli import parallel\n"
         "try:\n"
         "    parallel.start((2, 1), 'cpu')\n"
         "except ValueError as err:\n"
         "    print('REFUSED', err, 'INIT', dist.is_initialized()); sys.exit(3)\n"
         "t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t); print('SUM', float(t))\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**values):
    env = {k: v for k, v in os.environ.items() if k not in (
        "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE",
        "DIT_ACCEL_CP_TIMEOUT")}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            **{k: str(v) for k, v in values.items()}}


def _start(**env):
    return subprocess.Popen([sys.executable, "-c", START], cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _refusal(**env) -> str:
    proc = _start(**env)
    # (a guard against a hang, not a measure: importing torch and Diffusers took over 20 s on a loaded 2-core machine)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, out + err
    line = out.strip().splitlines()[-1]
    assert line.startswith("REFUSED ") and line.endswith(" INIT False"), line
    return line.removeprefix("REFUSED ").removesuffix(" INIT False")


def test_a_lone_rank_0_waits_the_bounded_time_then_says_so():
    said = _refusal(WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), DIT_ACCEL_CP_TIMEOUT=1)
    assert said == ("waited 1 s for 2 ranks (WORLD_SIZE=2) but only this process joined; start it with torchrun "
                    "--nproc_per_node 2 (DIT_ACCEL_CP_TIMEOUT=S waits longer)")


def test_a_lone_rank_1_waits_the_bounded_time_then_says_so():
    port = _free_port()
    said = _refusal(WORLD_SIZE=2, RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DIT_ACCEL_CP_TIMEOUT=1)
    assert said == (f"waited 1 s for 2 ranks (WORLD_SIZE=2) but rank 0 never answered at 127.0.0.1:{port}; start it "
                    "with torchrun --nproc_per_node 2 (DIT_ACCEL_CP_TIMEOUT=S waits longer)")


BAD_VARIABLES = {
    "no-addr": (dict(RANK=0, MASTER_PORT=29500), "--cp: WORLD_SIZE=2 is set but MASTER_ADDR is not: this process was "
                                                 "not started by torchrun"),
    "no-port": (dict(RANK=0, MASTER_ADDR="127.0.0.1"), "--cp: WORLD_SIZE=2 is set but MASTER_PORT is not"),
    "no-rank": (dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=29500), "--cp: WORLD_SIZE=2 is set but RANK is 'not set'"),
    "bad-port": (dict(RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT="x"), "--cp: MASTER_PORT='x' is not a port number"),
    "bad-timeout": (dict(RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500, DIT_ACCEL_CP_TIMEOUT="soon"),
                    "DIT_ACCEL_CP_TIMEOUT='soon': expected the seconds to wait for the other ranks"),
}
# each case's variables set in turn in one process (they are refused before any rendezvous, so nothing carries over
# from one case to the next but what the script resets): one Python start-up instead of five
EACH = ("import json, os, sys, torch.distributed as dist\n"
        "from dit_accel.cli import parallel\n"
        "names = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'DIT_ACCEL_CP_TIMEOUT')\n"
        "for case, env in json.loads(sys.argv[1]).items():\n"
        "    for name in names:\n"
        "        os.environ.pop(name, None)\n"
        "    os.environ.update(env)\n"
        "    try:\n"
        "        parallel.start((2, 1), 'cpu')\n"
        "        said = None\n"
        "    except ValueError as err:\n"
        "        said = str(err)\n"
        "    print(json.dumps([case, said, dist.is_initialized()]))\n")


@pytest.fixture(scope="module")
def refusals():
    cases = {case: {k: str(v) for k, v in env.items()} for case, (env, _) in BAD_VARIABLES.items()}
    res = subprocess.run([sys.executable, "-c", EACH, json.dumps(cases)], cwd=REPO, env=_env(WORLD_SIZE=2),
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return {case: (said, initialised) for case, said, initialised in map(json.loads, res.stdout.strip().splitlines())}


@pytest.mark.parametrize("case", list(BAD_VARIABLES))
def test_missing_or_bad_variables_are_one_line(refusals, case):
    said, initialised = refusals[case]
    says = BAD_VARIABLES[case][1]
    assert said is not None and not initialised, (case, said)
    assert "\n" not in said and said.startswith(says), said
    assert "torchrun" in said or says.startswith("DIT_ACCEL_CP_TIMEOUT"), said


def test_ranks_started_by_hand_form_the_group():
    port = _free_port()
    procs = [_start(WORLD_SIZE=2, RANK=r, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                    DIT_ACCEL_CP_TIMEOUT=15) for r in (0, 1)]
    outs = [p.communicate(timeout=40) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and out.strip().splitlines()[-1] == "SUM 3.0", out + err[-2000:]


def test_the_cli_prints_the_line_and_exits_2(tmp_path):
    cmd = [sys.executable, "-m", "dit_accel", "generate", "--model", "tiny-wan", "--cp", "ulysses=2", "--steps", "2",
           "--out", str(tmp_path / "o.mp4")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=_env(WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(),
                                  DIT_ACCEL_CP_TIMEOUT=1))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == (
        "dit-accel generate: error: waited 1 s for 2 ranks (WORLD_SIZE=2) but only this process joined; start it "
        "with torchrun --nproc_per_node 2 (DIT_ACCEL_CP_TIMEOUT=S waits longer)")
    assert not list(tmp_path.iterdir())
