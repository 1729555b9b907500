"""Test environment: must run before anything imports triton or diffusers."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the machine: one torch thread each. Two each (torch's default on 2 cores) oversubscribe it,
    # and a generation of the 2,304-token main-job model then runs several times slower. `generate` keeps a set
    # OMP_NUM_THREADS instead of its per-model thread count.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# dit_accel's own cache (self-check verdicts, autotune choices) per test process: a verdict a test provokes
# (a fault, a stubbed kernel) never reaches the user's ~/.cache, and every run checks the kernels afresh.
if "DIT_ACCEL_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["DIT_ACCEL_CACHE"] = tempfile.mkdtemp(prefix="dit_accel_tests_")
    # removed by the process that made it (subprocesses inherit the variable and finish first): 180 of these were
    # left in /tmp by a day's runs
    atexit.register(shutil.rmtree, os.environ["DIT_ACCEL_CACHE"], ignore_errors=True)
# ptxas / nvdisasm / cuobjdump outputs are a pure function of tool, flags and input bytes (dit_accel.kernels.tool_runs):
# kept across runs like triton's own cache, so a run after the first re-reads no unchanged kernel.
os.environ.setdefault("DIT_ACCEL_TOOL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit_accel", "tools"))

from dit_accel._util import use_interpreter_without_cuda  # noqa: E402  (imports neither torch nor triton)

use_interpreter_without_cuda()  # checked through the driver library: triton must not be imported first

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def _strict_interpreter_launches() -> None:
    """A compiled Triton launch refuses a keyword its kernel does not declare (KeyError: "Keyword argument ...
    was specified but unrecognised"); the interpreter drops it. Make the interpreter refuse it too, so a launcher
    that passes one fails here rather than on the first GPU it meets."""
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.runtime import interpreter

    options = set(CUDAOptions.__dataclass_fields__)
    call = interpreter.GridExecutor.__call__

    def strict_call(self, *args, **kwargs):
        unknown = sorted(k for k in kwargs if k not in self.arg_names and k not in options)
        if unknown:
            raise KeyError(f"Keyword argument {unknown[0]} was specified but unrecognised "
                           f"(kernel {self.fn.__name__}; a compiled launch refuses it)")
        return call(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = strict_call


if os.environ.get("TRITON_INTERPRET") == "1":
    _strict_interpreter_launches()
    # without the interpreter's repatching at every @triton.jit helper call, its discarded overflow checks and its
    # dtype table rebuilt per operation (dit_accel.kernels.interpreter): about half a kernel test's time
    from dit_accel.kernels.interpreter import speed_up_interpreter  # noqa: E402

    speed_up_interpreter()


# Worker seconds of the modules that take longest (the suite's junit reports on the 2-core machine, 2026-11-30: dcae608,
# and 76d0964 for the kernel modules and test_gpu_scripts; rounded). Their tests go to the workers first: a module stays
# on one worker (--dist loadscope), so one of them started last would run alone at the end while the other worker
# idles. A new module of 40 s or more belongs here.
SLOW_MODULES = {
    "tests/pipelines/test_compile.py": 245,
    "tests/models/test_long_clip_models.py": 195,
    "tests/comfyui/test_inputs_round9_workflows.py": 184,
    "tests/kernels/test_sla_glue_kernels.py": 172,
    "tests/eval/test_gpu_scripts.py": 148,
    "tests/pipelines/test_parallel.py": 128,
    "tests/cli/test_cli.py": 84,
    "tests/cli/test_main_job.py": 83,
    "tests/kernels/test_vsa_raster.py": 81,
    "tests/kernels/test_selfcheck.py": 78,
    "tests/training/test_finetune.py": 74,
    "tests/cli/test_cp_rendezvous.py": 72,
    "tests/models/test_tiny_shapes.py": 60,
    "tests/kernels/test_block_sparse_gather_bwd.py": 57,
    "tests/reliability/test_eval_faults.py": 55,
    "tests/kernels/test_vsa_gated.py": 53,
    "tests/pipelines/test_inputs_round11_parallel.py": 41,
}


def _scope(item) -> str:
    """xdist's loadscope unit: the module, or the class for a test in one."""
    return item.nodeid.rsplit("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    """The slowest modules first, then the rest by their number of tests (xdist's own order, which
    --no-loadscope-reorder hands to this hook); a module's tests keep their order."""
    counts: dict = {}
    for item in items:
        counts[_scope(item)] = counts.get(_scope(item), 0) + 1

    def weight(scope: str) -> tuple:
        return -SLOW_MODULES.get(scope.split("::")[0], 0), -counts[scope]

    order = {scope: i for i, scope in enumerate(sorted(counts, key=weight))}
    items.sort(key=lambda item: order[_scope(item)])  # stable: each scope's tests keep their order
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for modules of tiny tensors: on a shared 2-core machine extra
    threads only add scheduling latency (use with ``pytestmark = pytest.mark.usefixtures``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
