"""The ComfyUI snapshot for tests/comfyui (see comfy_env.py): imported once per process, or the tests skip."""

import pytest

from tests.comfyui.comfy_env import import_comfy, missing, snapshot


@pytest.fixture(scope="session")
def comfy():
    path = snapshot()
    if path is None:
        pytest.skip(missing())
    return import_comfy(path)
