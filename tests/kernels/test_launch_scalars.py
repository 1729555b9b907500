"""Launchers pass the softmax scale as a runtime float, never as a ``tl.constexpr``.

``scale * LOG2E`` with Triton's constexpr ``LOG2E`` is itself a constexpr: a launch then bakes the scale into
the kernel (one compile per distinct scale, and a kernel unlike the one whose SASS the compile tests check,
which take ``qk_scale`` as an fp32 argument). Host code must use ``LOG2E_HOST``. Read from the source: the
arithmetic in every function that is not a Triton kernel or helper (``@triton.jit``).
"""

import ast
import inspect

import pytest

from dit_accel.kernels.block_sparse import triton as block_sparse_triton
from dit_accel.kernels.dense import tiles
from dit_accel.kernels.dense import triton as dense_triton
from dit_accel.kernels.sla import triton as sla_triton

CONSTEXPRS = {"LOG2E", "LN2"}


def _jitted(node) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def _host_products(source: str, name: str) -> list:
    found = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.Lambda) or (isinstance(fn, ast.FunctionDef) and not _jitted(fn)):
            for node in ast.walk(fn):
                if isinstance(node, ast.BinOp) and {getattr(node.left, "id", None),
                                                     getattr(node.right, "id", None)} & CONSTEXPRS:
                    found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", [dense_triton, block_sparse_triton, sla_triton], ids=lambda m: m.__name__)
def test_host_code_never_multiplies_by_a_constexpr(module):
    assert _host_products(inspect.getsource(module), module.__name__) == []


def test_the_check_sees_a_constexpr_product_in_host_code_only():
    src = ("def launch(scale):\n    return scale * LOG2E\n\n"
           "@triton.jit\ndef kernel(x):\n    return x * LOG2E\n")
    assert _host_products(src, "fake") == ["fake:2: scale * LOG2E"]


def test_the_host_constant_is_a_float_equal_to_the_kernel_one():
    assert type(tiles.LOG2E_HOST) is float and tiles.LOG2E_HOST == tiles.LOG2E.value
