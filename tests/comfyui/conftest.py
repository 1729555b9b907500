"""The ComfyUI snapshot for tests/comfyui (see comfy_env.py): imported once per process, or the tests skip."""

import pytest

import dit_accel.plans.plan

from tests.comfyui.comfy_env import import_comfy, missing, snapshot
from tests.comfyui.models import ALL_CASES, CASES, build


@pytest.fixture(scope="session")
def comfy():
    path = snapshot()
    if path is None:
        pytest.skip(missing())
    return import_comfy(path)


@pytest.fixture(scope="module")
def wan(comfy):
    """The small Wan 2.1 T2V model of ComfyUI's own class, built once per test module."""
    return build(comfy, CASES["wan21-t2v"])


@pytest.fixture
def sparse_calls(monkeypatch):
    """The query lengths of the calls that ran a dit_accel plan (Plan.run: the one sparse execution path)."""
    seen = []
    run = dit_accel.plans.plan.Plan.run

    def counted(self, q, *args, **kwargs):
        seen.append(q.shape[2])
        return run(self, q, *args, **kwargs)

    monkeypatch.setattr(dit_accel.plans.plan.Plan, "run", counted)
    return seen


@pytest.fixture(scope="module")
def models(comfy):
    """``models(name)``: the tiny model of the case ``name`` (:data:`~tests.comfyui.models.ALL_CASES`), built once
    per test module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build(comfy, ALL_CASES[name])
        return built[name]

    return get
