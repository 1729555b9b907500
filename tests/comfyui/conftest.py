"""The ComfyUI snapshot for tests/comfyui (see comfy_env.py): imported once per process, or the tests skip."""

import pytest

from tests.comfyui.comfy_env import ENV, import_comfy, snapshot


@pytest.fixture(scope="session")
def comfy():
    path = snapshot()
    if path is None:
        pytest.skip(f"no ComfyUI snapshot: neither ${ENV} nor shared/comfyui/ComfyUI beside or above the repository "
                    "(CI lays it at ../shared/comfyui/ComfyUI)")
    return import_comfy(path)
