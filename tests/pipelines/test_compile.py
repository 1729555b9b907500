"""torch.compile after dit_accel.apply: the whole transformer and Diffusers' regional compilation
(compile_repeated_blocks), both with fullgraph=True (any graph break is an error), on tiny Wan and FLUX.

Every compiled output is compared with the same model run eagerly; the first compiled call is the model's
first call (no eager warm-up). Graph counts come from Dynamo's counters.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import dit_accel
from dit_accel.models.tiny import build_tiny_transformer, tiny_transformer_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "wan": {
        "tile": dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1)),
        "gna": dit_accel.GNA(kernel_size=(2, 5, 5), tile=(1, 8, 8)),
        "radial": dit_accel.Radial(block_size=64),
        "sla": dit_accel.SLA(topk=0.3),
        # (fullgraph raised on the twin's host read of each call's cube lists: the fine branch gathers when traced)
        "vsa": dit_accel.VSA(sparsity=0.5),
        "dense": dit_accel.Dense(),
    },
    "flux": {
        "tile": dit_accel.Tile(tile=(4, 4), window=(1, 1)),
        "gna": dit_accel.GNA(kernel_size=(5, 5)),
        "sla": dit_accel.SLA(topk=0.3),
        "dense": dit_accel.Dense(),
    },
}
CASES = [(model, name) for model, methods in METHODS.items() for name in methods]
# Grids of the resolution-change test: a second resolution of the same model.
GRIDS = {"wan": [(4, 8, 8), (4, 8, 12)], "flux": [(10, 13), (12, 16)]}
# Dynamo backends of the method matrix: graph breaks are Dynamo's (any backend finds them); AOT autograd's
# tracing of the attention code is checked on the blocks (regional), where it is cheap to run.
BACKEND = {"whole": "eager", "regional": "aot_eager"}
# Regional compilation compiles each block class once: Wan has one, FLUX two (double and single stream).
BLOCK_CLASSES = {"wan": 1, "flux": 2}


def _compiled(model, how: str, backend: str):
    torch._dynamo.reset()
    counters.clear()
    if how == "whole":
        return torch.compile(model, fullgraph=True, backend=backend)
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    return model


def _eager_outputs(model_name, method, calls, **apply_kwargs):
    """Outputs of an identical eager model with the same method: ``{(grid, step): out}``."""
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch", **apply_kwargs)
    out = {}
    with torch.no_grad():
        for grid, step, total in calls:
            if total is not None:
                handle.set_step(step, total)
            out[grid, step] = model(**tiny_transformer_inputs(model_name, model, grid=grid))[0]
    handle.remove()
    return out


@pytest.mark.parametrize("how", ["whole", "regional"])
@pytest.mark.parametrize("model_name, method_name", CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_fullgraph_compile_matches_eager(model_name, method_name, how):
    method = METHODS[model_name][method_name]
    grid = GRIDS[model_name][0]
    want = _eager_outputs(model_name, method, [(grid, 0, None)])[grid, 0]
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch")
    compiled = _compiled(model, how, BACKEND[how])
    kwargs = tiny_transformer_inputs(model_name, model, grid=grid)
    with torch.no_grad():
        first = compiled(**kwargs)[0]  # no eager warm-up: plans are built by the (eager) forward pre-hook
        second = compiled(**kwargs)[0]
    torch.testing.assert_close(first, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(second, want, atol=1e-6, rtol=1e-5)
    # Regional compilation: one graph per block class, shared by every block of it (the layers' plans are
    # not specialised into the graph by layer index).
    assert counters["stats"]["unique_graphs"] == (1 if how == "whole" else BLOCK_CLASSES[model_name])
    # Calls inside compiled code are still counted: 2 calls of every layer.
    summary = handle.summary()
    layers = summary["layers"]
    if method_name == "dense":
        assert (summary["sparse_calls"], summary["dense_calls"]) == (0, 2 * layers)
    else:
        assert (summary["sparse_calls"], summary["dense_calls"]) == (2 * layers, 0)
        assert summary["mean_density"] is not None and summary["mean_density"] < 1
    handle.remove()


@pytest.mark.parametrize("model_name, how, method_name", [("wan", "regional", "tile"), ("flux", "whole", "gna")])
def test_steps_do_not_recompile_and_a_resolution_compiles_once(model_name, how, method_name):
    """dense_steps=1 over 3 steps: one graph for the dense step and one for the sparse steps; a second
    resolution adds one graph per phase; going back and forth adds none."""
    method = METHODS[model_name][method_name]
    grids = GRIDS[model_name]
    calls = [(grid, step, 3) for grid in grids for step in range(3)]
    want = _eager_outputs(model_name, method, calls, dense_steps=1)
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch", dense_steps=1)
    compiled = _compiled(model, how, "eager")  # recompiles are Dynamo's guards: any backend counts them
    per_phase = 1 if how == "whole" else BLOCK_CLASSES[model_name]
    graphs = []
    with torch.no_grad():
        for grid, step, total in calls + calls:
            handle.set_step(step, total)
            out = compiled(**tiny_transformer_inputs(model_name, model, grid=grid))[0]
            torch.testing.assert_close(out, want[grid, step], atol=1e-6, rtol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    # steps 0, 1, 2 at the first grid, then at the second, then both again
    assert graphs == [per_phase, 2 * per_phase, 2 * per_phase, 3 * per_phase, 4 * per_phase, 4 * per_phase] + \
        [4 * per_phase] * 6
    handle.remove()


@pytest.mark.parametrize("model_name, how, method_name", [("wan", "regional", "radial"), ("flux", "whole", "sla")])
def test_inductor_compile_matches_eager(model_name, how, method_name):
    """The inductor backend (C++ codegen on CPU) with fullgraph=True."""
    method = METHODS[model_name][method_name]
    grid = GRIDS[model_name][0]
    want = _eager_outputs(model_name, method, [(grid, 0, None)])[grid, 0]
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch")
    compiled = _compiled(model, how, "inductor")
    with torch.no_grad():
        got = compiled(**tiny_transformer_inputs(model_name, model, grid=grid))[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert handle.summary()["sparse_calls"] == handle.summary()["layers"]
    handle.remove()


def test_compiled_layers_report_warnings_and_skip_capture(tmp_path):
    """Inside compiled code a layer cannot warn or capture; its notes reach the handle after the call."""
    model = build_tiny_transformer("wan")
    handle = dit_accel.apply(model, METHODS["wan"]["tile"], backend="torch", capture=tmp_path, timing=True)
    compiled = _compiled(model, "whole", "aot_eager")
    with torch.no_grad():
        compiled(**tiny_transformer_inputs("wan", model))
    warnings = " ".join(handle.warnings)
    assert "capture does not save layers" in warnings and "not measured inside torch.compile" in warnings
    assert not list(tmp_path.iterdir())
    handle.remove()


# ---- the video families added in issue 28 (whole-model fullgraph compile after apply, GNA).
VIDEO_NEW = {name: dit_accel.GNA(kernel_size=(2, 5, 5))
             for name in ("cosmos", "allegro", "consisid", "motif", "hunyuan15", "kandinsky5", "kandinsky6",
                          "easyanimate", "helios", "wan_animate", "ltx2", "minimax_h3")}
VIDEO_NEW["latte"] = dit_accel.GNA(kernel_size=(5, 5))  # spatial blocks: a 2-D grid per frame
# HunyuanVideo 1.5's own forward branches on `torch.all(image_embeds == 0)` and reorders the text by its mask
# (data-dependent): even the dense model has no whole fullgraph, so its repeated blocks are compiled fullgraph.
VIDEO_NEW_HOW = {"hunyuan15": "regional"}


@pytest.mark.parametrize("model_name", sorted(VIDEO_NEW))
def test_fullgraph_compile_new_video_families(model_name):
    method = VIDEO_NEW[model_name]
    want = _eager_outputs(model_name, method, [(None, 0, None)])[None, 0]
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch")
    how = VIDEO_NEW_HOW.get(model_name, "whole")
    compiled = _compiled(model, how, "eager")
    with torch.no_grad():
        out = compiled(**tiny_transformer_inputs(model_name, model))[0]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    if how == "whole":
        assert counters["stats"]["unique_graphs"] == 1
    else:
        assert counters["stats"]["unique_graphs"] >= 1
    summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (summary["layers"], 0)
    handle.remove()


# ----------------------------------------------------------------- image families (models-image)
IMAGE_FAMILIES = ("flux2", "qwenimage", "sd3", "cogview4", "hunyuanimage", "chroma")


@pytest.mark.parametrize("model_name", IMAGE_FAMILIES)
def test_image_families_compile_fullgraph_after_apply(model_name):
    """Whole-model fullgraph compile (Dynamo, eager backend) of each image family after apply: no graph
    break, same output as eager, every layer sparse."""
    method = dit_accel.GNA(kernel_size=(5, 5))
    grid = (10, 13)
    want = _eager_outputs(model_name, method, [(grid, 0, None)])[grid, 0]
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch")
    compiled = _compiled(model, "whole", "eager")
    with torch.no_grad():
        got = compiled(**tiny_transformer_inputs(model_name, model, grid=grid))[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert handle.summary()["sparse_calls"] == handle.summary()["layers"]
    handle.remove()


# ----------------------------------------------------------------- image families (models-image-b)
# FLUX.3 compiles whole. The other forwards break Dynamo graphs in their own code, dit_accel or not (Lumina2 and
# Qwen-Image 2.1 sync on masks, HiDream routes its MoE by data, Z-Image enters a device context): for them the
# modules that hold the wrapped attention compile with fullgraph=True (Diffusers' regional compilation where
# the class has repeated blocks).
IMAGE_B_WHOLE = ("flux3",)
IMAGE_B_PARTS = {"qwenimage21": r"transformer_blocks\.\d+", "zimage": r"(noise_refiner|layers)\.\d+",
                 "lumina2": r"(noise_refiner|layers)\.\d+",
                 "hidream": r"(double|single)_stream_blocks\.\d+\.block\.attn1"}


@pytest.mark.parametrize("model_name", IMAGE_B_WHOLE + tuple(IMAGE_B_PARTS))
def test_image_b_families_compile_fullgraph_after_apply(model_name):
    import re

    method = dit_accel.GNA(kernel_size=(5, 5))
    want = _eager_outputs(model_name, method, [(None, 0, None)])[None, 0]
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch")
    if model_name in IMAGE_B_WHOLE:
        model = _compiled(model, "whole", "eager")
    else:
        torch._dynamo.reset()
        counters.clear()
        parts = [m for n, m in model.named_modules() if re.fullmatch(IMAGE_B_PARTS[model_name], n)]
        assert parts
        for part in parts:
            part.compile(fullgraph=True, backend="eager")
    with torch.no_grad():
        got = model(**tiny_transformer_inputs(model_name, model))[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1
    summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (summary["layers"], 0)
    handle.remove()


@pytest.mark.parametrize("model_name", sorted(IMAGE_B_PARTS))
def test_image_b_dense_forwards_break_graphs_by_themselves(model_name):
    """Why the test above compiles parts: the model's own forward breaks fullgraph, without dit_accel."""
    model = build_tiny_transformer(model_name)
    torch._dynamo.reset()
    with pytest.raises(Exception), torch.no_grad():
        torch.compile(model, fullgraph=True, backend="eager")(**tiny_transformer_inputs(model_name, model))


# ----------------------------------------------------------------- call forms with tokens beside the grid
def _flux3_reference_call(model):
    """FLUX.3 image-to-image: a 4 x 5 reference image after the image (routed exact after the grid)."""
    kwargs = tiny_transformer_inputs("flux3", model)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 10), rows, cols, torch.zeros_like(rows)], -1).reshape(-1, 4)
    return {**kwargs, "image_cond_hidden_states": torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(5)),
            "image_cond_ids": ids}


def _ltx_condition_call(model):
    """LTXConditionPipeline: the grid read from video_coords, one conditioning frame prepended (exact)."""
    from tests.pipelines.test_ltx_condition import _condition_call

    return _condition_call(model, extra_frames=1, batch=1)


CALL_FORMS = {"flux3-reference": ("flux3", _flux3_reference_call, dit_accel.GNA(kernel_size=(3, 5))),
              "ltx-condition": ("ltx", _ltx_condition_call, dit_accel.GNA(kernel_size=(3, 6, 6)))}


@pytest.mark.parametrize("form", sorted(CALL_FORMS))
def test_call_forms_with_extra_tokens_compile_fullgraph_after_apply(form):
    """Reference tokens after the grid and conditioning tokens before it: one whole fullgraph, eager's output."""
    model_name, call, method = CALL_FORMS[form]
    eager = build_tiny_transformer(model_name)
    with dit_accel.apply(eager, method, backend="torch"), torch.no_grad():
        want = eager(**call(eager))[0]
    model = build_tiny_transformer(model_name)
    handle = dit_accel.apply(model, method, backend="torch")
    compiled = _compiled(model, "whole", "eager")
    with torch.no_grad():
        got = compiled(**call(model))[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (summary["layers"], 0)
    handle.remove()
