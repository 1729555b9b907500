"""Context parallelism and ``dit-accel selftest`` beside what users do (round 24): context parallelism without a
process group, with too few ranks or with a mesh that disagrees with its degrees; selftest asked for a variant that
does not run on the device, a damaged verdict file, and what its first line says about the cache. Each test names
what was wrong before its fix. No torchrun launch: the checks run before any collective."""

import argparse
import json
import warnings
from types import SimpleNamespace

import pytest
from dit_accel.kernels import selfcheck
from dit_accel.models import tiny as T


def _wan(heads: int = 2):
    import diffusers

    entry = T.TRANSFORMERS["wan"]
    return getattr(diffusers, entry.class_name)(**{**entry.config, "num_attention_heads": heads})


class _Mesh:
    """A stand-in for a DeviceMesh: its dimension names and sizes, and this rank's place in it."""

    def __init__(self, names, shape, coordinate=(0, 0)):
        self.mesh_dim_names, self.shape, self._coordinate = names, shape, coordinate

    def get_coordinate(self):
        return self._coordinate


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_context_parallelism_without_a_process_group_says_to_start_torchrun():
    """Before: torch's "Error initializing torch.distributed using env:// rendezvous: environment variable RANK
    expected, but not set". Now one line saying how to start the ranks; the model is left as it was."""
    from diffusers import ContextParallelConfig

    from dit_accel.pipelines.parallel import enable_context_parallel

    model = _wan(2)
    with pytest.raises(ValueError, match=r"over 2 ranks needs a process group, and torch.distributed is not "
                                         r"initialised in this process: start 2 processes with `torchrun "
                                         r"--nproc_per_node 2 \.\.\.`"):
        enable_context_parallel(model, ContextParallelConfig(ulysses_degree=2))
    assert getattr(model, "_parallel_config", None) is None


def test_more_ranks_than_the_process_group_holds_is_refused_before_the_model_changes(one_rank_group):
    """Before: torch's RuntimeError "Mesh should not be bigger than default world size 1, but found 2 ranks!"."""
    from diffusers import ContextParallelConfig

    from dit_accel.pipelines.parallel import enable_context_parallel

    model = _wan(2)
    with pytest.raises(ValueError, match=r"ulysses_degree x ring_degree = 2 needs 2 ranks, and the process group "
                                         r"has 1: start 2 processes with `torchrun --nproc_per_node 2 \.\.\.`, or "
                                         "lower the degrees"):
        enable_context_parallel(model, ContextParallelConfig(ring_degree=2))
    assert getattr(model, "_parallel_config", None) is None


def test_the_cli_checks_the_process_group_before_any_transformer_changes(one_rank_group):
    """``--cp`` on Wan 2.2's two transformers: the refusal comes before the first one is split."""
    from diffusers import ContextParallelConfig

    from dit_accel.cli.parallel import enable

    first, second = _wan(2), _wan(2)
    pipe = SimpleNamespace(transformer=first, transformer_2=second)
    with pytest.raises(ValueError, match="needs 2 ranks, and the process group has 1"):
        enable(pipe, ContextParallelConfig(ulysses_degree=2))
    assert getattr(first, "_parallel_config", None) is None and getattr(second, "_parallel_config", None) is None


def test_a_mesh_whose_sizes_disagree_with_the_degrees_is_refused():
    """Before: ``ContextParallelConfig(ring_degree=2, mesh=<ring 1 x ulysses 2>)`` ran under torchrun with dit_accel
    splitting by the degrees and exchanging over the mesh's groups: a dense Wan call 0.05 away from one process's,
    without a word. Now refused by enable (before the model changes) and by apply (Split.of)."""
    from diffusers import ContextParallelConfig

    from dit_accel.pipelines.parallel import Split, enable_context_parallel

    cp = ContextParallelConfig(ring_degree=2, mesh=_Mesh(("ring", "ulysses"), (1, 2)))
    said = (r"ContextParallelConfig\(ulysses_degree=1, ring_degree=2\) was given a mesh of ring 1, ulysses 2: its "
            r"'ring' and 'ulysses' dimensions must have those sizes .*shape \(2, 1, \.\.\.\)\); build the mesh with "
            "the degrees, or leave mesh out")
    model = _wan(2)
    with pytest.raises(ValueError, match=said):
        enable_context_parallel(model, cp)
    assert getattr(model, "_parallel_config", None) is None
    with pytest.raises(ValueError, match=said):
        Split.of(SimpleNamespace(context_parallel_config=cp))
    unnamed = ContextParallelConfig(ulysses_degree=2, mesh=_Mesh(None, (2,)))
    with pytest.raises(ValueError, match="was given a mesh of no named dimensions"):
        Split.of(SimpleNamespace(context_parallel_config=unnamed))


def test_a_mesh_that_does_not_hold_this_rank_is_refused(one_rank_group):
    """A mesh of the right sizes that leaves this process out: it would take part in no exchange."""
    from diffusers import ContextParallelConfig

    from dit_accel.pipelines.parallel import mesh_error

    cp = ContextParallelConfig(ulysses_degree=2, mesh=_Mesh(("ring", "ulysses"), (1, 2), coordinate=None))
    assert "does not hold this process (rank 0)" in mesh_error(cp)
    assert mesh_error(ContextParallelConfig(ulysses_degree=2, mesh=_Mesh(("ring", "ulysses", "fsdp"), (1, 2, 4)))) \
        is None


# ------------------------------------------------------------------ dit-accel selftest
def _args(**kw):
    return argparse.Namespace(**{"device": "cpu", "json": False, "variant": None, "jobs": None, "budget": None, **kw})


@pytest.fixture
def no_checks(monkeypatch, tmp_path):
    """The selftest CLI with its checks stubbed: what it says and returns, not the kernels."""
    from dit_accel.cli import selftest

    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    for store in (selfcheck._MEMORY, selfcheck._FAST):
        store.clear()
    selfcheck._LOADED.clear()
    ran = []
    monkeypatch.setattr(selfcheck, "run_all", lambda *a, **k: ran.append(k.get("names")) or [])
    monkeypatch.setattr(selftest, "_print_status", lambda: None)
    yield ran, tmp_path
    for store in (selfcheck._MEMORY, selfcheck._FAST):
        store.clear()
    selfcheck._LOADED.clear()


def test_selftest_of_a_variant_that_does_not_run_on_the_device_is_not_a_pass(no_checks, capsys):
    """Before: ``selftest --device cpu --variant block_sparse.triton.fwd_ws`` printed "0 of 0 checked, 0 failed" and
    exited 0, as if the variant had passed. Now exit 2 with the reason it does not run there."""
    from dit_accel.cli import selftest

    ran, _ = no_checks
    assert selftest.run(_args(variant=["block_sparse.triton.fwd_ws"])) == 2
    err = capsys.readouterr().err
    assert "--variant block_sparse.triton.fwd_ws: it does not run on cpu (the warp-specialized forward" in err
    assert "nothing to check here; name a variant that runs on cpu" in err
    assert ran == []
    assert selftest.run(_args(variant=["block_sparse.triton.fwd_ws", "dense.triton.fwd"])) == 0  # one runs: fine
    assert ran == [["block_sparse.triton.fwd_ws", "dense.triton.fwd"]]


def test_selftest_says_its_checks_run_afresh_and_warns_of_a_damaged_verdict_file(no_checks, capsys):
    """Before: the first line said "(cached verdicts: PATH)", which a second run read as verdicts reused (every check
    runs again), and a truncated selfcheck.json was replaced without a word. Now the line says so, and the damaged
    file is named in a warning."""
    from dit_accel.cli import selftest

    _, folder = no_checks
    (folder / "selfcheck.json").write_text('{"dense.triton.fwd|cpu": {"ok": tr')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert selftest.run(_args(variant=["dense.triton.fwd"])) == 0
    out = capsys.readouterr().out
    assert "each check runs afresh and its verdict is saved for first use in" in out and "cached verdicts" not in out
    said = [str(w.message) for w in seen]
    assert any("selfcheck.json: is not valid JSON" in m and "the variants are checked again" in m for m in said), said
    json.dumps(said)  # (plain text)


def test_selftest_does_not_call_the_checks_of_a_dead_worker_disabled(no_checks, monkeypatch, capsys):
    """A worker process that died fails its checks without storing them (the next use checks again): the closing
    line said "these variants are disabled" of them too. Now it says they did not finish and how to see why."""
    import torch

    from dit_accel.cli import selftest

    crash = selfcheck._row(selfcheck._crash_entry(RuntimeError("boom"), torch.device("cpu"),
                                                  ("dense.triton.fwd", torch.float32, {"n": 64})))
    assert crash["verdict"] == "FAIL" and crash["crashed"] is True
    monkeypatch.setattr(selfcheck, "run_all", lambda *a, **k: [crash])
    monkeypatch.setattr(selftest, "_print", lambda rows: None)
    assert selftest.run(_args(variant=["dense.triton.fwd"])) == 1
    err = capsys.readouterr().err
    assert "1 check(s) did not finish: the worker process running them died" in err and "disabled" not in err
