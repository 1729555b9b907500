"""The first-use self-check (dit_accel.kernels.selfcheck): every variant against its fp32 twin, the fault
switch that proves the check catches a broken kernel, the fallback and the refusal, the cached verdicts and
`dit-accel selftest`. Runs through the Triton interpreter (fp32 / fp16: its bf16 dot is wrong)."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dit_accel.kernels import BlockLayout, backends, request, selfcheck
from dit_accel.kernels.backends import BackendUnavailable, Request

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels through the interpreter on CPU")

SHAPE = {"head_dim": 64, "block_q": 64, "block_k": 64}
WS_SHAPE = {"head_dim": 128, "block_q": 128, "block_k": 128}
CPU = torch.device("cpu")


def _reset():
    for store in (selfcheck._MEMORY, selfcheck._FAST):
        store.clear()
    selfcheck._LOADED.clear()
    selfcheck._WARNED.clear()


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    for name in (selfcheck.ENV_FAULT, selfcheck.ENV_SELFCHECK, backends.ENV_BACKEND):
        monkeypatch.delenv(name, raising=False)
    _reset()
    yield
    _reset()


CPU_VARIANTS = ["block_sparse.triton.fwd", "block_sparse.triton.fwd_len", "block_sparse.triton.fwd_gather",
                "block_sparse.triton.bwd",
                "dense.triton.fwd", "dense.triton.bwd", "sla.triton.classify", "sla.triton.fwd", "sla.triton.bwd",
                "sla.triton.bwd_glue"]


def test_every_registered_variant_is_listed_with_the_names_the_fault_switch_takes():
    names = [v.name for v in selfcheck.variants()]
    assert set(CPU_VARIANTS + ["block_sparse.triton.fwd_ws"]) <= set(names)
    with pytest.raises(ValueError, match="no kernel variant named 'nope'.*block_sparse.triton.fwd"):
        selfcheck.variant("nope")


@pytest.mark.parametrize("name", CPU_VARIANTS)
def test_each_variant_passes_and_the_fault_switch_makes_it_fail(name, monkeypatch):
    """The check reaches the variant's real launch path: corrupting that output (and only it) fails it."""
    ok = selfcheck.verdict(name, CPU, torch.float16, SHAPE)
    assert ok["ok"] and ok["error"] is not None and ok["error"] <= ok["tolerance"], ok
    monkeypatch.setenv(selfcheck.ENV_FAULT, name)
    bad = selfcheck.verdict(name, CPU, torch.float16, SHAPE)
    assert not bad["ok"] and (bad["error"] is None or bad["error"] > 10 * bad["tolerance"]), bad


def test_the_ws_forward_and_its_resume_pass_are_checked_on_a_pretended_sm90(monkeypatch):
    from dit_accel.kernels.block_sparse import triton as bst

    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    ok = selfcheck.verdict("block_sparse.triton.fwd_ws", CPU, torch.float16, WS_SHAPE)
    assert ok["ok"] and "ws + resume" in ok["problem"], ok
    monkeypatch.setenv(selfcheck.ENV_FAULT, "block_sparse.triton.fwd_ws")
    assert not selfcheck.verdict("block_sparse.triton.fwd_ws", CPU, torch.float16, WS_SHAPE)["ok"]


def test_a_failed_ws_variant_falls_back_to_the_one_loop_kernel_with_one_warning(monkeypatch):
    """auto's next verified variant: the launcher skips ws (whose output would be corrupted) and the
    one-loop kernel gives the right numbers; the warning names the variant and its error, once."""
    from dit_accel.kernels.block_sparse import triton as bst
    from dit_accel.kernels.reference import dense_attention_reference

    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    monkeypatch.setattr(bst, "ws_pays", lambda *a, **k: True)
    monkeypatch.setenv("DIT_ACCEL_WS", "1")  # the ws forward is opt-in
    _pretend_ws_applies(monkeypatch)
    monkeypatch.setenv(selfcheck.ENV_FAULT, "block_sparse.triton.fwd_ws")
    ran = []
    real = bst._ws_forward
    monkeypatch.setattr(bst, "_ws_forward", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    n, d = 200, 128
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:128, :128] = True
    layout = BlockLayout.from_dense_mask(mask, block_q=128, block_k=128)
    q, k, v = (torch.randn(2, 2, n, d).half() for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, _ = bst.triton_forward(q, k, v, layout, d ** -0.5)
        bst.triton_forward(q, k, v, layout, d ** -0.5)
    # The first run is the self-check's own (forced ws, its output corrupted); both calls then decline ws.
    assert ran == [True, False, False]
    ref, _ = dense_attention_reference(q, k, v, mask, d ** -0.5)
    assert selfcheck.relative_error(o, ref) < 1e-2
    said = [str(w.message) for w in caught if "block_sparse.triton.fwd_ws" in str(w.message)]
    assert len(said) == 1 and "relative error" in said[0] and "disabled" in said[0], said


def test_a_forced_backend_raises_instead_of_returning_wrong_numbers(monkeypatch):
    from dit_accel.kernels import block_sparse_attention, sla_attention
    from dit_accel import SLA

    q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))
    layout = BlockLayout.from_dense_mask(torch.ones(100, 100, dtype=torch.bool).tril(), 64, 64)
    monkeypatch.setenv(selfcheck.ENV_FAULT, "block_sparse.triton.fwd")
    with pytest.raises(selfcheck.VariantFailed, match=r"block_sparse.triton.fwd failed its self-check .*relative "
                                                      r"error .*backend='auto'"):
        block_sparse_attention(q, k, v, layout, backend="triton")
    assert block_sparse_attention(q, k, v, layout, backend="torch").shape == q.shape  # the twin still runs
    monkeypatch.setenv(selfcheck.ENV_FAULT, "sla.triton.classify")
    with pytest.raises(BackendUnavailable, match="sla.triton.classify failed its self-check"):
        sla_attention(q, k, v, SLA(topk=0.25), backend="triton")


def test_auto_skips_a_backend_whose_check_failed(monkeypatch):
    """On a (pretended) GPU, auto's table order takes the next backend when triton's variant failed."""
    calls = []
    monkeypatch.setattr(selfcheck, "usable", lambda name, *a, **k: calls.append(name) or False)
    request = Request(torch.device("cuda"), torch.float16, 64, q_len=256, kv_len=256)
    table = dict(backends._TABLE)
    table["block_sparse"] = (("triton", lambda r: None, True), ("flex", lambda r: None, False),
                             ("torch", lambda r: None, True))
    monkeypatch.setattr(backends, "_TABLE", table)
    monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "0")
    assert backends.resolve("block_sparse", "auto", request) == "torch"
    assert calls == ["block_sparse.triton.fwd"]
    grad = Request(torch.device("cuda"), torch.float16, 64, needs_grad=True)
    calls.clear()
    _reset()  # the verdicts memoised per call signature
    monkeypatch.setattr(selfcheck, "usable", lambda name, *a, **k: calls.append(name) or name.endswith("fwd"))
    assert backends.resolve("block_sparse", "auto", grad) == "torch"  # the backward failed
    assert calls == ["block_sparse.triton.fwd", "block_sparse.triton.bwd"]


def test_bf16_through_the_interpreter_is_refused_with_the_reason():
    from dit_accel.kernels import block_sparse_attention

    q, k, v = (torch.randn(1, 1, 64, 32, dtype=torch.bfloat16) for _ in range(3))
    layout = BlockLayout.from_dense_mask(torch.ones(64, 64, dtype=torch.bool), 32, 32)
    with pytest.raises(BackendUnavailable, match="interpreter's bfloat16 dot is wrong"):
        block_sparse_attention(q, k, v, layout, backend="triton")


def _counting_variant(name, result):
    runs = []

    def check(device, dtype, shape):
        runs.append(dtype)
        if isinstance(result, Exception):
            raise result
        return result

    selfcheck.register(selfcheck.Variant(name, "test", "fake", lambda device: None, check))
    return runs


def test_verdicts_are_cached_on_disk_and_reused_by_a_new_process(tmp_path):
    runs = _counting_variant("test.fake.fwd", selfcheck.Result(1e-4, 1e-2, "tiny"))
    try:
        assert selfcheck.usable("test.fake.fwd", CPU, torch.float16, SHAPE)
        assert selfcheck.usable("test.fake.fwd", CPU, torch.float16, SHAPE)
        assert len(runs) == 1
        stored = json.loads((tmp_path / "selfcheck.json").read_text())
        (key,) = [k for k in stored if k.startswith("test.fake.fwd|")]
        assert "float16" in key and "d64 64x64" in key and "dit_accel" in key and "torch" in key
        _reset()  # a new process: memory empty, the file stays
        assert selfcheck.usable("test.fake.fwd", CPU, torch.float16, SHAPE)
        assert len(runs) == 1
        assert selfcheck.usable("test.fake.fwd", CPU, torch.float32, SHAPE) and len(runs) == 2  # another dtype
        selfcheck.clear()
        assert not (tmp_path / "selfcheck.json").exists()
    finally:
        selfcheck._REGISTRY.pop("test.fake.fwd")


def test_a_crashing_check_is_a_failure_with_its_message_and_faulted_verdicts_stay_in_memory(tmp_path, monkeypatch):
    _counting_variant("test.fake.crash", RuntimeError("illegal memory access"))
    try:
        entry = selfcheck.verdict("test.fake.crash", CPU, torch.float16, SHAPE)
        assert not entry["ok"] and "RuntimeError: illegal memory access" in entry["problem"]
        monkeypatch.setenv(selfcheck.ENV_FAULT, "dense.triton.fwd")
        selfcheck.verdict("dense.triton.fwd", CPU, torch.float16, SHAPE)
        stored = json.loads((tmp_path / "selfcheck.json").read_text())
        assert not any(k.startswith("dense.triton.fwd|") for k in stored)  # a simulated fault is not persisted
    finally:
        selfcheck._REGISTRY.pop("test.fake.crash")


def test_a_cache_that_cannot_be_written_is_said_once_and_the_verdict_still_holds(tmp_path, monkeypatch):
    """``DIT_ACCEL_CACHE`` naming a file (or a read-only home): the verdicts were kept per process without a word, so
    every process checked again. One warning names the folder and what to set."""
    from dit_accel import atomic_files

    not_a_folder = tmp_path / "cache_file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(not_a_folder))
    monkeypatch.setattr(atomic_files, "_UNWRITABLE", set())
    runs = _counting_variant("test.fake.rocache", selfcheck.Result(1e-4, 1e-2, "tiny"))
    try:
        with pytest.warns(UserWarning, match=f"cannot write its cache in {not_a_folder} \\(a file, not a folder\\)"
                                             ".*set DIT_ACCEL_CACHE to a writable folder"):
            assert selfcheck.usable("test.fake.rocache", CPU, torch.float16, SHAPE)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per folder
            assert selfcheck.usable("test.fake.rocache", CPU, torch.float32, SHAPE)
        assert selfcheck.usable("test.fake.rocache", CPU, torch.float16, SHAPE) and len(runs) == 2
        assert not_a_folder.read_text() == "x"
    finally:
        selfcheck._REGISTRY.pop("test.fake.rocache")


def test_selfcheck_off_trusts_every_variant(monkeypatch):
    runs = _counting_variant("test.fake.off", selfcheck.Result(1.0, 1e-2, "wrong"))
    try:
        monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "0")
        assert selfcheck.usable("test.fake.off", CPU, torch.float16, SHAPE) and runs == []
        # A value that is neither on nor off left the checks on without a word: now it names the variable.
        monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "disable")
        with pytest.raises(ValueError, match=r"DIT_ACCEL_SELFCHECK='disable': expected 1 .*, 0 \(trust every"):
            selfcheck.usable("test.fake.off", CPU, torch.float16, SHAPE)
        assert runs == []
        monkeypatch.delenv(selfcheck.ENV_SELFCHECK)
        with pytest.warns(UserWarning, match="test.fake.off failed its self-check"):
            assert not selfcheck.usable("test.fake.off", CPU, torch.float16, SHAPE)
    finally:
        selfcheck._REGISTRY.pop("test.fake.off")


def test_a_variant_trusted_inside_a_graph_is_still_checked_on_the_next_eager_call(monkeypatch):
    """Tracing or capturing runs no check and trusts an unchecked variant for now; the per-call memo must not
    keep that answer, or the variant would never be checked."""
    runs = _counting_variant("test.fake.graph", selfcheck.Result(1.0, 1e-2, "wrong"))
    args = ("test.fake.graph", CPU, torch.float16, SHAPE["head_dim"], SHAPE["block_q"], SHAPE["block_k"])
    try:
        monkeypatch.setattr(request, "in_graph", lambda: True)
        assert selfcheck.usable_fast(*args) and runs == []
        monkeypatch.setattr(request, "in_graph", lambda: False)
        with pytest.warns(UserWarning, match="test.fake.graph failed its self-check"):
            assert not selfcheck.usable_fast(*args)
        assert runs == [torch.float16]
        assert not selfcheck.usable_fast(*args) and runs == [torch.float16]  # memoised once checked
    finally:
        selfcheck._REGISTRY.pop("test.fake.graph")


def test_relative_error_counts_non_finite_output_as_infinite():
    ref = torch.tensor([1.0, 2.0, float("-inf")])
    assert selfcheck.relative_error(ref.clone(), ref) == 0.0
    assert selfcheck.relative_error(torch.tensor([1.0, float("nan"), float("-inf")]), ref) == float("inf")
    assert selfcheck.relative_error(torch.tensor([1.0, 2.0, 0.0]), ref) == float("inf")  # -inf row lost


def _cli(*args, env=None):
    full = {**os.environ, **(env or {})}
    full.pop(selfcheck.ENV_FAULT, None) if not env or selfcheck.ENV_FAULT not in env else None
    return subprocess.run([sys.executable, "-m", "dit_accel.cli.main", "selftest", *args], capture_output=True,
                          text=True, env=full, timeout=600)


def test_selftest_cli_json_table_fault_and_refusals(tmp_path):
    env = {"DIT_ACCEL_CACHE": str(tmp_path)}
    good = _cli("--device", "cpu", "--json", "--variant", "dense.triton.fwd", env=env)
    assert good.returncode == 0, good.stderr
    rows = json.loads(good.stdout)
    assert [r["variant"] for r in rows] == ["dense.triton.fwd", "dense.triton.fwd"]  # fp32 and fp16
    assert all(r["verdict"] == "pass" and r["error"] < r["tolerance"] for r in rows)
    bad = _cli("--device", "cpu", "--variant", "dense.triton.fwd", env={**env, selfcheck.ENV_FAULT: "dense.triton.fwd"})
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "FAILED" in bad.stderr
    header = bad.stdout.splitlines()[1].split()
    assert header == ["variant", "dtype", "problem", "error", "verdict", "time"]
    status = bad.stdout.split("\nstatus:\n", 1)[1]  # what the verdicts do not show
    assert all(f"  {key}: " in status for key in ("fp32", "torch.compile", "CUDA graphs", "warp-specialized forward"))
    if not torch.cuda.is_available():
        cuda = _cli("--device", "cuda", env=env)
        assert cuda.returncode == 2 and "no CUDA device" in cuda.stderr and "Traceback" not in cuda.stderr
    unknown = _cli("--variant", "nope", env=env)
    assert unknown.returncode == 2 and "no such variant" in unknown.stderr


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) rounded to tf32's 10 mantissa bits, to nearest (what tensor cores read)."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def test_fp32_bounds_follow_the_products_precision():
    """A correct kernel that multiplies fp32 inputs in tf32 (the block-sparse and dense kernels on a GPU) is
    off by about 1e-3 at the self-check's GPU problem: the exact-product bound (1e-4) would call it broken,
    the tf32 model's bound holds it with room, and exact-product kernels keep the tight bound."""
    from dit_accel.kernels import _selfchecks as sc
    from dit_accel.kernels.reference import dense_attention_reference

    cuda = torch.device("cuda")
    shape = {"head_dim": 128, "block_q": 64, "block_k": 64}
    q, k, v, mask, _, _ = sc._block_sparse_problem(torch.device("cpu"), torch.float32, shape)
    scale = shape["head_dim"] ** -0.5
    s = (_tf32(q) @ _tf32(k).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = _tf32(p) @ _tf32(v)
    ref, _ = dense_attention_reference(q, k, v, mask, scale)
    err = selfcheck.relative_error(o, ref)
    assert sc.FWD_TOL[torch.float32] < err < sc._tol(sc.FWD_TOL, cuda, torch.float32, True) / 2, err
    assert sc._tol(sc.FWD_TOL, torch.device("cpu"), torch.float32, True) == sc.FWD_TOL[torch.float32]
    assert sc._tol(sc.BWD_TOL, cuda, torch.float32, False) == sc.BWD_TOL[torch.float32]
    assert sc._tol(sc.BWD_TOL, cuda, torch.float32, True) == 16 * 2.0 ** -11
    assert sc._tol(sc.FWD_TOL, cuda, torch.bfloat16, True) == sc.FWD_TOL[torch.bfloat16]


def test_selftest_covers_fp32_on_a_gpu():
    from dit_accel.kernels.selfcheck import _default_dtypes

    assert torch.float32 in _default_dtypes(torch.device("cuda"))


def _pretend_ws_applies(monkeypatch):
    """The ws variant applies on sm_90 only (``selfcheck.usable`` says no elsewhere): pretend this is one."""
    import dataclasses

    from dit_accel.kernels import selfcheck as _sc

    name = "block_sparse.triton.fwd_ws"
    monkeypatch.setitem(_sc._REGISTRY, name, dataclasses.replace(_sc.variant(name), applies=lambda device: None))


def test_selftest_stops_at_its_budget_and_says_n_of_m_checked(capsys):
    """A run out of time lists what it did not reach as unchecked (not passed, not failed) and says how many
    of how many it checked; the exit status (3) tells a script that coverage is incomplete."""
    from dit_accel.cli.main import main

    ticks = iter(range(100))
    rows = selfcheck.run_all(CPU, names=["dense.triton.fwd"], budget_s=1.5, clock=lambda: next(ticks))
    assert [r["verdict"] for r in rows] == ["pass", "unchecked"], rows  # one check started before 1.5 s
    assert rows[1]["dtype"] == "float16" and "time budget" in rows[1]["reason"]
    assert main(["selftest", "--device", "cpu", "--variant", "dense.triton.fwd", "--budget", "0"]) == 3
    out = capsys.readouterr()
    assert "0 of 2 checked, 0 failed; 2 not reached within --budget 0 s" in out.out
    assert main(["selftest", "--device", "cpu", "--variant", "dense.triton.fwd", "--json", "--budget", "0"]) == 3
    out = capsys.readouterr()
    assert {r["verdict"] for r in json.loads(out.out)} == {"unchecked"} and "0 of 2 checked" in out.err
    assert main(["selftest", "--device", "cpu", "--jobs", "0"]) == 2
    assert "--jobs 0: give a positive number" in capsys.readouterr().err


def test_selftest_workers_still_running_past_budget_and_grace_are_abandoned():
    """With workers, a check still running when the budget and its grace have passed is not waited for (on an H100
    the in-flight compiles ran a 140 s budget 30 s over, into the caller's limit, and no JSON came back): its row
    says unchecked, and the run returns."""
    ticks = iter(range(100))
    rows = selfcheck.run_all(CPU, names=["dense.triton.fwd"], jobs=2, budget_s=1.5, grace_s=0.0,
                             clock=lambda: next(ticks))
    assert [r["verdict"] for r in rows] == ["unchecked", "unchecked"], rows  # the first was submitted, then dropped
    assert all("time budget" in r["reason"] for r in rows)


def test_selftest_jobs_run_the_checks_in_worker_processes_and_still_catch_a_fault(monkeypatch):
    """``jobs=2``: the checks run in two spawned workers (where a GPU compiles its kernels side by side); the
    fault switch reaches them, the rows come back in order, the progress counts N of M, and the verdicts are
    kept for this process's calls."""
    monkeypatch.setenv(selfcheck.ENV_FAULT, "dense.triton.fwd")
    seen = []
    rows = selfcheck.run_all(CPU, names=["dense.triton.fwd"], jobs=2,
                             progress=lambda done, total, row: seen.append((done, total)))
    assert [(r["variant"], r["dtype"], r["verdict"]) for r in rows] == [
        ("dense.triton.fwd", "float32", "FAIL"), ("dense.triton.fwd", "float16", "FAIL")], rows
    assert seen == [(1, 2), (2, 2)]
    assert all(r["error"] is None or r["error"] > 10 * r["tolerance"] for r in rows)
    kept = [v for v in selfcheck._MEMORY.values() if v["variant"] == "dense.triton.fwd"]
    assert len(kept) == 2 and not any(v["ok"] for v in kept) and all(v["faulted"] for v in kept)


def test_the_worker_pool_starts_the_longest_checks_first(monkeypatch, tmp_path):
    """On a fresh H200 the SLA fp32 checks (about a minute each) came last in variant order: 94 of 96 checks in 160 s
    for 551 s of work on 8 workers. The pool now submits the longest first (a previous run's seconds from this
    machine's verdict cache, else the H200's), and the rows still come back in variant order."""
    from concurrent.futures import Future

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    submitted = []

    class Pool:
        def __init__(self, max_workers, mp_context):
            self._processes = {}

        def submit(self, fn, device, name, dtype, shape):
            submitted.append((name, str(dtype).replace("torch.", "")))
            fut = Future()
            entry = {"variant": name, "dtype": str(dtype).replace("torch.", ""), "problem": "p", "error": 0.0,
                     "tolerance": 1.0, "ok": True, "seconds": 0.5}
            fut.set_result((None, entry))
            return fut

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", Pool)
    names = ["dense.triton.fwd", "block_sparse.triton.bwd", "sla.triton.fwd", "sla.triton.bwd"]
    rows = selfcheck.run_all(CPU, names=names, jobs=2)
    assert submitted[:2] == [("sla.triton.bwd", "float32"), ("sla.triton.fwd", "float32")], submitted
    assert submitted[2][0] == "sla.triton.bwd" and submitted[-1][0] in ("dense.triton.fwd", "sla.triton.fwd")
    order = [v.name for v in selfcheck.variants()]
    assert [r["variant"] for r in rows] == sorted((r["variant"] for r in rows), key=order.index)  # variant order
    assert len(rows) == len(submitted) and all(r["verdict"] == "pass" for r in rows)
    key = selfcheck._key("dense.triton.fwd", CPU, torch.float16, selfcheck.plan(CPU, ["dense.triton.fwd"])[1][0][2])
    monkeypatch.setitem(selfcheck._MEMORY, key, {"seconds": 500.0})  # this machine's last run: the longest now
    assert selfcheck.expected_seconds(CPU, "dense.triton.fwd", torch.float16,
                                      selfcheck.plan(CPU, ["dense.triton.fwd"])[1][0][2]) == 500.0


def test_a_spawned_worker_knows_the_variants_registered_outside_the_kernels_core():
    """A spawned worker imports only what unpickling its task needs (``dit_accel.kernels.selfcheck``). VSA's
    variant registers in its own package: on the first GPU run every ``vsa.triton.coarse`` check of
    ``selftest --jobs 8`` failed with "no kernel variant named 'vsa.triton.coarse'" in the workers."""
    rows = selfcheck.run_all(CPU, names=["vsa.triton.coarse"], jobs=2)
    assert [(r["variant"], r["verdict"]) for r in rows] == [("vsa.triton.coarse", "pass")] * 2, rows


def test_the_fp32_bound_says_what_is_compared_and_prints_the_bound_itself(capsys):
    """The tf32 bound is 3.9e-3: printed to one digit it read "<= 4e-03", a bound the check does not use; the
    messages name the quantity (||out - ref|| / ||ref|| against the fp32 reference of the same inputs)."""
    from dit_accel.cli import selftest
    from dit_accel.cli.info import _kernel_status
    from dit_accel.kernels import _selfchecks as sc

    row = {"variant": "dense.triton.fwd", "dtype": "float32", "problem": "p", "error": 1.5e-3,
           "tolerance": sc.TF32_FWD_TOL, "verdict": "pass", "seconds": 1.0}
    selftest._print([row])
    out = capsys.readouterr().out
    assert "1.50e-03 (bound 3.9e-03)" in out and "4e-03" not in out
    said = selfcheck._describe({**row, "error": 5e-3})
    assert said == "relative error ||out - ref|| / ||ref|| against the fp32 reference: 0.005 > its bound 3.9e-03 on p"
    said = selfcheck._describe({**row, "error": 0.5, "tolerance": 0.01, "measure": "fraction of classes that differ"})
    assert said == "fraction of classes that differ: 0.5 > its bound 1.0e-02 on p"
    text = _kernel_status()["fp32"]
    assert "same fp32 inputs" in text and "o's and the lse's" in text and "dQ's, dK's and dV's" in text
    assert f"{sc.TF32_FWD_TOL:.1e}" in text and f"{sc.TF32_BWD_TOL:.1e}" in text
