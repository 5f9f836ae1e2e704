"""Memory bank: EMA update, normalisation, sampling and the two score paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pirl import memory
from pirl.memory import MemoryBank


def test_initial_bank_is_unit_norm_and_seeded() -> None:
    a, b = MemoryBank(100, 16, seed=3), MemoryBank(100, 16, seed=3)
    assert torch.equal(a.bank, b.bank)
    torch.testing.assert_close(a.bank.norm(dim=1), torch.ones(100))


def test_ema_update_by_hand() -> None:
    bank = MemoryBank(10, 4, momentum=0.5, seed=0)
    before = bank.bank.clone()
    feats = F.normalize(torch.randn(3, 4), dim=1)
    idx = torch.tensor([1, 4, 8])
    bank.update(idx, feats)
    for row, i in enumerate(idx.tolist()):
        mixed = 0.5 * before[i].double() + 0.5 * feats[row].double()
        want = mixed / mixed.norm()
        torch.testing.assert_close(bank.bank[i].double(), want, rtol=1e-6, atol=1e-6)
    untouched = [i for i in range(10) if i not in idx.tolist()]
    assert torch.equal(bank.bank[untouched], before[untouched])


def test_scores_both_paths_equal_brute_force() -> None:
    z = F.normalize(torch.randn(5, 8), dim=1)
    for size, n in ((40, 100), (400, 30)):  # bank smaller than N, and larger
        bank = MemoryBank(size, 8, seed=1)
        idx = bank.sample((5, n), torch.Generator().manual_seed(0))
        assert idx.min() >= 0 and idx.max() < size
        want = torch.stack([bank.bank[idx[b]] @ z[b] for b in range(5)])
        torch.testing.assert_close(bank.scores(z, idx), want, rtol=1e-5, atol=1e-6)


def test_blocked_scores_and_gradient_equal_a_plain_gather() -> None:
    """Forward and backward of the blocked path against autograd through bank[idx] @ z."""
    bank = MemoryBank(300, 8, seed=2)
    idx = bank.sample((5, 70), torch.Generator().manual_seed(3))
    assert torch.equal(idx, idx.sort(dim=1).values) and idx.max() < 300
    weights = torch.randn(5, 70)
    for budget in (8 * 16, 8 * 70 * 2, 1 << 20):  # row blocks, sample blocks, one block
        z = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)), dim=1)
        z_ref = z.clone().requires_grad_()
        want = torch.bmm(bank.bank[idx], z_ref.unsqueeze(2)).squeeze(2)
        (want * weights).sum().backward()
        z.requires_grad_()
        got = memory._GatherScores.apply(z, bank.bank, idx, budget)
        (got * weights).sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_through_a_half_precision_bank_keeps_small_weights(dtype: torch.dtype) -> None:
    """The backward's weights are cast to the bank's dtype: scaled first, gradients of order
    1e-9 (below float16's smallest normal) still come out at 16-bit precision."""
    bank = MemoryBank(300, 8, seed=2, dtype=dtype)
    idx = bank.sample((5, 70), torch.Generator().manual_seed(3))
    weights = torch.randn(5, 70, generator=torch.Generator().manual_seed(5)) * 1e-9
    z = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    z.requires_grad_()
    (bank.scores(z, idx) * weights).sum().backward()
    want = torch.einsum("bn,bnd->bd", weights.double(), bank.bank[idx].double())
    err = (z.grad.double() - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() < 2 * torch.finfo(dtype).eps


def test_shared_negatives_score_one_draw_for_the_whole_batch() -> None:
    bank = MemoryBank(500, 8, seed=5)
    z = F.normalize(torch.randn(4, 8), dim=1)
    idx = bank.sample((60,), torch.Generator().manual_seed(6))
    want = torch.stack([torch.stack([bank.bank[j] @ z[b] for j in idx]) for b in range(4)])
    torch.testing.assert_close(bank.scores(z, idx), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bank_mixes_in_float32(dtype: torch.dtype) -> None:
    full, half = MemoryBank(50, 16, seed=7), MemoryBank(50, 16, seed=7, dtype=dtype)
    assert half.bank.dtype == dtype and half.bank.element_size() == 2
    tol = {"rtol": 0, "atol": 1e-2 if dtype == torch.bfloat16 else 1e-3}
    torch.testing.assert_close(half.bank.float(), full.bank, **tol)
    before = half.bank.double()
    feats = F.normalize(torch.randn(3, 16), dim=1)
    idx = torch.tensor([2, 9, 30])
    half.update(idx, feats)
    mixed = 0.5 * before[idx] + 0.5 * feats.double()
    want = mixed / mixed.norm(dim=1, keepdim=True)
    torch.testing.assert_close(half.bank[idx].double(), want, **tol)
    z = F.normalize(torch.randn(2, 16), dim=1)
    neg = half.sample((2, 40), torch.Generator().manual_seed(8))
    brute = torch.stack([half.bank[neg[b]].float() @ z[b] for b in range(2)])
    torch.testing.assert_close(half.scores(z, neg), brute, rtol=1e-5, atol=1e-6)


def test_init_is_the_same_for_any_thread_count_and_uniform_before_normalising() -> None:
    size = memory.INIT_ROWS + 1000  # two chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = MemoryBank(size, 4, seed=9).bank
        torch.set_num_threads(2)
        two = MemoryBank(size, 4, seed=9).bank
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and not torch.equal(one, MemoryBank(size, 4, seed=10).bank)
    assert not torch.equal(one[:1000], one[memory.INIT_ROWS :])  # chunks seeded apart
    # Directions of a uniform cube: each coordinate's sign is a fair coin.
    assert abs((one > 0).float().mean().item() - 0.5) < 0.01


def test_sorted_uniform_is_sorted_uniform_and_independent_of_the_sort() -> None:
    """Renyi's construction against randint + sort: same per-position order statistics
    (k-th smallest of n uniforms has mean k / (n + 1)), uniform counts (chi-square)."""
    gen = torch.Generator().manual_seed(0)
    high, n, reps = 1000, 50, 4000
    draws = memory.sorted_uniform(high, (reps, n), gen)
    assert draws.dtype == torch.int64 and draws.min() >= 0 and draws.max() < high
    assert bool((draws[:, 1:] >= draws[:, :-1]).all())
    counts = torch.bincount(draws.flatten(), minlength=high).double()
    expected = reps * n / high
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < (high - 1) + 5 * (2 * (high - 1)) ** 0.5
    ref = torch.randint(0, high, (reps, n), generator=gen).sort(dim=1).values
    k = torch.arange(1, n + 1, dtype=torch.float64)
    want = k / (n + 1) * high - 0.5  # mean of floor(high * U_(k))
    se = high * (k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2) * reps)).sqrt()
    for got in (draws, ref):  # the test itself holds for the reference
        assert bool(((got.double().mean(0) - want).abs() < 5 * se + 0.01).all())


@pytest.mark.parametrize("world", [1, 8, 32])
def test_first_step_z_matches_vissls_bank_averaged_over_its_ranks(world: int) -> None:
    """VISSL's procedure, simulated: each of `world` ranks fills its bank uniformly in
    [-stdv, stdv) with stdv = 1 / sqrt(d / 3) and normalises the rows (init_memory with
    norm_init); the first forward averages the ranks' banks (sync_memory, all_reduce_mean);
    Z is then mean(exp(s / T)) x |D| (compute_partition_function). Our bank from init_ranks
    gives the same Z: about 2.2 |D| from unit rows, 1.03 |D| on 32 GPUs (the issue's audit)."""
    from pirl.nce import PirlLoss

    n, d, t = 4000, 128, 0.07
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(256, d, generator=gen), dim=1)
    stdv = 1 / math.sqrt(d / 3)
    ranks = [torch.rand(n, d, generator=gen) * 2 * stdv - stdv for _ in range(world)]
    vissl = torch.stack([F.normalize(b, dim=1) for b in ranks]).mean(0)
    memory = MemoryBank(n, d, seed=1, init_ranks=world)

    def z_over_size(bank: torch.Tensor) -> float:  # over every row: no sampling noise
        return torch.exp(z @ bank.T / t).mean().item()

    ours = z_over_size(memory.bank)
    assert ours == pytest.approx(z_over_size(vissl), rel=0.03)
    assert ours == pytest.approx({1: 2.2, 8: 1.1, 32: 1.03}[world], rel=0.05)
    expected_norm = vissl.norm(dim=1).mean().item()  # 1, 0.35, 0.18
    assert memory.bank.norm(dim=1).mean().item() == pytest.approx(expected_norm, rel=0.02)
    # the loss's own first-step Z, from 64 images' positives and 1,024 negatives each
    loss = PirlLoss(memory, num_negatives=1024, temperature=t, lam=0.0, loss="nce")
    loss(z[:64], None, torch.arange(64), torch.Generator().manual_seed(3))
    first = math.exp(loss.criterion.log_z.item()) / n
    assert first == pytest.approx(ours, rel=0.05)


def test_one_rank_keeps_the_unit_bank_and_the_paper_recipe_starts_as_vissls_32_gpus() -> None:
    from pirl.pretrain import PretrainConfig

    bank = MemoryBank(300, 8, seed=2).bank
    assert torch.equal(bank, MemoryBank(300, 8, seed=2, init_ranks=1).bank)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(300))
    assert PretrainConfig(data="x").resolved().bank_init_ranks == 32
    assert PretrainConfig().resolved().bank_init_ranks == 1
