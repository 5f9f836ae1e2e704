"""Memory bank: EMA update, normalisation, sampling and the two score paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
