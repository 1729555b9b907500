"""The CUDA-only decisions and bookkeeping, round 12 (second wave), driven on the CPU: each fix test pins one fault
found there. torch.func over the block-sparse, SLA and VSA entry points (a forced Triton backend, an eager call's
cached decision, ``auto`` on a CUDA device) and over the dense choice (its CUDA branch's timed winner); ``bench gpu``'s
VSA efficiency on partial cubes, with a stubbed timer. The numbers are checked against fp64 masked softmax attention
and a token-pair count written here, and against the kernels' own backward through plain autograd, through the
Triton interpreter."""

import os

import pytest
import torch

from dit_accel.kernels import BlockLayout, SLAParams, backends, block_sparse_attention, selfcheck, sla_attention
from dit_accel.kernels.backends import BackendUnavailable, Request, resolve

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels through the interpreter on CPU")]

REFUSED = r"torch\.func transforms.*backend='torch'"


@pytest.fixture
def trusted(monkeypatch, tmp_path):
    """The kernels run unchecked (their self-checks are proven in test_selfcheck.py), with a fresh cache folder."""
    monkeypatch.setenv("DIT_ACCEL_CACHE", str(tmp_path))
    monkeypatch.setenv(selfcheck.ENV_SELFCHECK, "0")
    monkeypatch.delenv(selfcheck.ENV_FAULT, raising=False)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)


def _qkv(n, d, h=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g) for _ in range(3)]


def _brute(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v over the token mask, in fp64."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


N, D = 40, 8
MASK = torch.rand(2, N, N, generator=torch.Generator().manual_seed(1)) < 0.5
MASK[..., 0] = True  # (every row sees a key)
SLA_PARAMS = SLAParams(topk=0.5)  # (the fused kernel's 64-token blocks: 128 tokens, two blocks each way)


def _layout():
    """A fresh layout per test: its call decisions are cached on it."""
    return BlockLayout.from_dense_mask(MASK, 16, 16)


def _entry(name, backend, layout=None):
    """``fn(q, k, v)`` of the entry point ``name`` on ``backend``, and its inputs."""
    if name == "block_sparse":
        layout = layout or _layout()
        return (lambda q, k, v: block_sparse_attention(q, k, v, layout, backend=backend)), _qkv(N, D)
    return (lambda q, k, v: sla_attention(q, k, v, SLA_PARAMS, backend=backend)), _qkv(128, 16, h=1)


# ------------------------------------------------------------ torch.func over the Triton kernels
@pytest.mark.parametrize("transform", ["grad", "jacrev"])
@pytest.mark.parametrize("name", ["block_sparse", "sla"])
def test_torch_func_gradient_over_a_forced_triton_kernel_is_refused_naming_the_twin(name, transform, trusted):
    """Before: ``torch.func.grad`` over ``block_sparse_attention(backend="triton")`` or ``sla_attention(backend=
    "triton")`` raised torch's "In order to use an autograd.Function with functorch transforms ..., it must override
    the setup_context staticmethod", about dit_accel's internals. Now BackendUnavailable names backend='torch'."""
    fn, (q, k, v) = _entry(name, "triton")
    run = {"grad": lambda: torch.func.grad(lambda a: fn(a, k, v).sum())(q),
           "jacrev": lambda: torch.func.jacrev(lambda a: fn(a, k, v)[0, 0, :2])(q)}[transform]
    with pytest.raises(BackendUnavailable, match=REFUSED):
        run()


@pytest.mark.parametrize("name", ["block_sparse", "sla"])
def test_an_eager_training_calls_triton_choice_is_not_reused_under_torch_func(name, trusted):
    """Before: the eager call cached its decision per call signature (shapes, dtypes, whether autograd records):
    a torch.func.grad call of the same signature took it unchecked and failed with torch's raw setup_context error."""
    fn, (q, k, v) = _entry(name, "triton")
    fn(q.requires_grad_(), k, v).sum().backward()  # (an eager training call: "triton", cached)
    with pytest.raises(BackendUnavailable, match=REFUSED):
        torch.func.grad(lambda a: fn(a, k, v).sum())(q.detach())


def test_torch_func_gradient_on_the_twin_matches_the_brute_force(trusted):
    """What the message advises: backend='torch' under torch.func.grad gives the fp64 brute force's gradient."""
    fn, (q, k, v) = _entry("block_sparse", "torch")
    got = torch.func.grad(lambda a: fn(a, k, v).pow(2).sum())(q)
    ref = q.double().requires_grad_()
    want, = torch.autograd.grad(_brute(ref, k, v, MASK).pow(2).sum(), ref)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_sla_torch_func_gradient_on_the_twin_matches_the_kernels_autograd_gradient(trusted):
    fn, (q, k, v) = _entry("sla", "torch")
    got = torch.func.grad(lambda a: fn(a, k, v).pow(2).sum())(q)
    kernel, _ = _entry("sla", "triton")
    ref = q.clone().requires_grad_()
    want, = torch.autograd.grad(kernel(ref, k, v).pow(2).sum(), ref)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["block_sparse", "sla"])
def test_vmap_over_the_triton_kernels_still_runs_and_matches_per_sample_calls(name, trusted):
    """vmap records no backward: the kernels' custom ops run one sample at a time (torch's fallback), as before."""
    fn, (q, k, v) = _entry(name, "triton")
    stack = [torch.stack([t, t.flip(-2)]) for t in (q, k, v)]
    got = torch.vmap(fn)(*stack)
    for i in range(2):
        torch.testing.assert_close(got[i], fn(*(t[i] for t in stack)), atol=1e-6, rtol=1e-6)


def test_auto_on_a_cuda_device_takes_the_twin_for_a_torch_func_gradient(trusted, monkeypatch):
    """Before: ``auto`` on CUDA took the Triton kernels for a torch.func.grad call (the raw setup_context error in
    a training step under torch.func); now it takes the PyTorch twin there, and still Triton for plain autograd."""
    monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "0")
    monkeypatch.setattr(backends, "triton_reason", lambda device: None)  # (a CUDA machine with triton)
    cuda = torch.device("cuda")
    picked = {}

    def step(a, family, block):
        request = Request(cuda, torch.float16, 64, needs_grad=True, block_q=block, block_k=block)
        picked[family] = resolve(family, "auto", request)
        return a.sum()

    for family, block in (("block_sparse", 64), ("sla", 64)):
        assert resolve(family, "auto", Request(cuda, torch.float16, 64, True, block, block)) == "triton"
        torch.func.grad(step)(torch.ones(2), family, block)
        assert picked[family] == "torch", (family, picked)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vsa_under_a_torch_func_transform_says_why_it_cannot_run(backend, transform, trusted, fresh_vsa):
    """Before: torch.func.grad over vsa_attention raised torch's raw setup_context error on every backend (the twin's
    gated coarse branch and selection are autograd.Functions too), and vmap a storage or scatter_ error."""
    from dit_accel.kernels.vsa import vsa_attention

    q, k, v = _qkv(60, 8, h=1)
    fn = (lambda a, b, c: vsa_attention(a, b, c, (2, 5, 6), topk=1, tile=(2, 4, 4), backend=backend))
    run = {"grad": lambda: torch.func.grad(lambda a: fn(a, k, v).sum())(q),
           "vmap": lambda: torch.vmap(fn)(q[None], k[None], v[None])}[transform]
    with pytest.raises(BackendUnavailable, match=r"vsa_attention cannot run under torch\.func.*torch\.autograd\.grad"):
        run()


# ------------------------------------------------------------ bench gpu: efficiency = speed-up x true density
class _StubTimer:
    """Every call 2 ms of device time, 0.1 ms of host time; no graphs (a CPU run of the CUDA report)."""

    def sync(self):
        pass

    def span(self, fn, calls):
        for _ in range(calls):
            fn()
        return 2e-3 * calls, 1e-4 * calls

    def graph(self, fn, calls):
        raise RuntimeError("CUDA graphs need a CUDA device")


def test_bench_gpu_vsa_efficiency_uses_the_true_pair_density_on_partial_cubes(trusted, fresh_vsa, monkeypatch):
    """Before: a VSA row's density (and so its fraction of the ideal) was the selected share of the cubes, 0.25 at
    sparsity 0.75; on a grid of partial cubes (Wan's 21 frames) those hold fewer tokens and random inputs select
    them more often, so the pairs visited were 0.187 of N^2 here and the efficiency was overstated by a third."""
    from dit_accel.eval import bench_gpu_cases
    from dit_accel.eval.bench import ModelShape
    from dit_accel.kernels.vsa import vsa_attention

    monkeypatch.setenv("DIT_ACCEL_AUTOTUNE", "0")
    grid, heads, d = (5, 6, 10), 2, 16  # cubes of 64, 32, 16, 8 and 4 real tokens
    rows = []
    shape = bench_gpu_cases._Shape(ModelShape("partial cubes", grid, heads, head_dim=d), torch.device("cpu"),
                                   torch.float32, False, _StubTimer(), 1, 1, lambda: 1e9, rows, [], lambda m: None)
    shape.dense_rows(only="dense SDPA")
    shape.sparse_rows("vsa", 0.25, "off", None)
    row = next(r for r in rows if r["kernel"] == "vsa [auto, autotune off]")
    assert row["status"] == "ok", row
    # The brute force: the token mask of the selection of the same inputs (made here), counted pair by pair.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 300, d, generator=g) for _ in range(3))
    _, sel = vsa_attention(q, k, v, grid, sparsity=0.75, tile=(4, 4, 4), backend="torch", return_selection=True)
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    cube = ((t // 4) * 2 * 3 + (h // 4) * 3 + (w // 4)).reshape(-1)  # each raster token's cube, t-major
    chosen = torch.zeros(1, heads, 12, 12, dtype=torch.bool).scatter_(-1, sel, True)
    mask = chosen[:, :, cube][:, :, :, cube]
    true = mask.double().mean().item()
    assert abs(true - 0.25) > 0.02  # (the case the fix is about: the share is not the density here)
    assert row["density"] == pytest.approx(true, rel=1e-9)
    assert row["fraction_of_ideal"] == pytest.approx(row["speedup"] * true, rel=1e-9)


def test_the_dense_choice_under_torch_func_takes_no_triton_kernel_an_eager_call_timed_fastest(trusted, fresh_choices,
                                                                                              monkeypatch):
    """Before: the dense choice (``fastest_attention``, and block-sparse ``auto`` where it runs dense attention on
    CUDA) kept the eager training call's measured winner per call signature; where that was the in-repo Triton
    kernel, a torch.func.grad call of the same signature ran it and failed with "dense_attention cannot run ...:
    call dit_accel.kernels.dense.fastest_attention", the very function called. Now a torch.func call takes the fixed
    order less the Triton kernel (timing nothing), and its gradient is the brute force's."""
    from dit_accel.kernels.dense import choice

    monkeypatch.setattr(choice, "_CHOSEN", {})
    q, k, v = _qkv(32, 16)
    timed = []

    def triton_fastest(fn, warmup, repeats):  # (the CUDA timer's place: the Triton kernel measured fastest)
        timed.append(fn)
        return 1.0 if len(timed) == len(choice.candidates(q, k, False)) else 5.0

    assert choice.candidates(q, k, False)[-1] == "triton"
    assert choice.choose(q.clone().requires_grad_(), k, v, 0.25, False, tune=True, timer=triton_fastest) == "triton"
    picked = []

    def loss(a):
        name = choice.choose(a, k, v, 0.25, False, tune=True, timer=triton_fastest)
        picked.append((name, choice.candidates(a, k, False)))
        return choice.run_candidate(name, a, k, v, 0.25, False)[0].pow(2).sum()

    count = len(timed)
    got = torch.func.grad(loss)(q)
    assert picked[0][0] != "triton" and "triton" not in picked[0][1] and len(timed) == count, picked
    ref = q.double().requires_grad_()
    want, = torch.autograd.grad(_brute(ref, k, v, torch.ones(32, 32, dtype=torch.bool)).pow(2).sum(), ref)  # (scale
    # 0.25 = 1/sqrt(16), the brute force's)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_a_plans_cached_backend_is_not_reused_under_torch_func(trusted):
    """An applied plan resolves its backend once per eager call signature: an eager training call's "triton" was
    reused by a torch.func.grad call of the same signature (which the kernels then refuse with torch's raw
    setup_context error). The key says whether torch.func is active, so the refusal names the twin."""
    import dit_accel

    plan = dit_accel.SLA(topk=0.5).plan((2, 8, 8))
    q, k, v = (t.requires_grad_() for t in _qkv(128, 16, h=1))
    assert plan.backend_for(q, k, v, "triton") == "triton"
    with pytest.raises(BackendUnavailable, match=REFUSED):
        torch.func.grad(lambda a: plan.backend_for(a, k, v, "triton") and a.sum())(q.detach())
