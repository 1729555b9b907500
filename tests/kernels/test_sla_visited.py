"""sla_visited: an SLA call's true density and work, against a brute-force count of its token mask."""
import pytest
import torch

from dit_accel.kernels.sla import sla_classify, sla_visited
from dit_accel.kernels.sla.common import CRITICAL
from dit_accel.methods import SLA


def _brute_force(q, k, method):
    """Every query-key pair whose two blocks the classification calls critical, counted one by one; the work: every
    critical block in full."""
    classes = sla_classify(q, k, method).classes  # [B, H, nQ, nK]
    n_q, n_k = q.shape[-2], k.shape[-2]
    rows = torch.arange(n_q) // method.block_q
    cols = torch.arange(n_k) // method.block_k
    mask = classes[:, :, rows][:, :, :, cols] == CRITICAL  # [B, H, Nq, Nk]
    pairs = mask.sum().item()
    blocks = (classes == CRITICAL).sum().item()
    total = q.shape[0] * q.shape[1] * n_q * n_k
    return pairs / total, blocks * method.block_q * method.block_k / total


def _qkv(n_q, n_k, last_block_wins: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, n_q, 32, generator=g)
    k = torch.randn(2, 3, n_k, 32, generator=g)
    if last_block_wins:  # a direction every query shares, and only the last key block: its top key block
        u = torch.randn(32, generator=g)
        q += 2 * u
        k[..., -(n_k % 64 or 64):, :] += 3 * u
    return q, k


@pytest.mark.parametrize("n_q,n_k,block_q", [(130, 130, 64), (200, 257, 64), (130, 257, 128), (128, 192, 64)])
@pytest.mark.parametrize("last_block_wins", [False, True])
def test_true_density_and_work_are_the_token_masks(n_q, n_k, block_q, last_block_wins):
    method = SLA(topk=0.3, block_q=block_q)
    q, k = _qkv(n_q, n_k, last_block_wins)
    got = sla_visited(q, k, method)
    true, work = _brute_force(q, k, method)
    assert got["true_density"] == pytest.approx(true, rel=1e-12)
    assert got["work_vs_dense"] == pytest.approx(work, rel=1e-12)
    if n_k % 64 == 0 and n_q % block_q == 0:  # no ragged block: the work is the pattern's
        assert got["true_density"] == pytest.approx(got["work_vs_dense"], rel=1e-12)
    else:
        assert got["true_density"] < got["work_vs_dense"]


def test_a_ragged_last_key_block_counts_its_own_keys():
    """130 keys in blocks of 64 (the last of 2), one critical block per query block: picking the last block visits
    2 of its 64 columns, not the 64 of sla_density's block share."""
    q, k = _qkv(130, 130, last_block_wins=True)
    method = SLA(topk=0.2)  # ceil(0.2 * 3) = 1 block
    got = sla_visited(q, k, method)
    assert got["true_density"] == pytest.approx(2 / 130)
    assert got["work_vs_dense"] == pytest.approx(3 * 64 * 64 / 130 ** 2)
