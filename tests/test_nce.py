"""NCE and InfoNCE against a direct float64 evaluation of the published formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pirl.memory import MemoryBank
from pirl.nce import InfoNCELoss, NCELoss, PirlLoss

EPS = float(np.finfo("float32").eps)  # VISSL's NCECriterion.eps


def nce_reference(
    s: np.ndarray, data_size: int, z: float | None = None, eps: float = EPS
) -> tuple[float, float]:
    """VISSL's NCECriterion straight from its formula: P = exp(s)/Z, Z = mean(exp(s)) |D|,
    c = N/|D|, loss = -log(P_0 / (P_0 + c + eps)) - sum_j log(c / (P_j + c + eps))."""
    e = np.exp(s)
    if z is None:
        z = e.mean() * data_size
    p = e / z
    n = s.shape[1] - 1
    c = n / data_size
    per_sample = -np.log(p[:, 0] / (p[:, 0] + c + eps)) - np.log(c / (p[:, 1:] + c + eps)).sum(1)
    return float(per_sample.mean()), float(z)


def scores(bank: MemoryBank, z: torch.Tensor, idx: torch.Tensor, neg: torch.Tensor, t: float):
    """(B, 1 + N) float64 scores <m_j, z> / T, positive first, computed apart from the loss."""
    m, zz = bank.bank.double().numpy(), z.double().numpy()
    pos = (m[idx.numpy()] * zz).sum(1, keepdims=True)
    return np.concatenate([pos, np.einsum("bnd,bd->bn", m[neg.numpy()], zz)], 1) / t


def test_nce_matches_formula_and_fixes_z_at_first_call() -> None:
    g = torch.Generator().manual_seed(0)
    crit = NCELoss(data_size=5000, temperature=0.07)
    pos, neg = torch.rand(6, generator=g) * 2 - 1, torch.rand(6, 40, generator=g) * 2 - 1
    s = torch.cat([pos[:, None], neg], 1).double().numpy() / 0.07
    want, z = nce_reference(s, 5000)
    assert math.isclose(crit(pos, neg).item(), want, rel_tol=1e-5)
    # Second call: Z stays the first one.
    pos2, neg2 = torch.rand(6, generator=g), torch.rand(6, 40, generator=g)
    s2 = torch.cat([pos2[:, None], neg2], 1).double().numpy() / 0.07
    want2, _ = nce_reference(s2, 5000, z=z)
    assert math.isclose(crit(pos2, neg2).item(), want2, rel_tol=1e-5)


def test_nce_ema_z_tracks_batches() -> None:
    g = torch.Generator().manual_seed(1)
    crit = NCELoss(data_size=100, temperature=0.5, z_momentum=0.9)
    a = (torch.rand(4, generator=g), torch.rand(4, 9, generator=g))
    b = (torch.rand(4, generator=g) - 0.5, torch.rand(4, 9, generator=g) - 0.5)
    crit(*a)
    _, z1 = nce_reference(torch.cat([a[0][:, None], a[1]], 1).double().numpy() / 0.5, 100)
    _, zb = nce_reference(torch.cat([b[0][:, None], b[1]], 1).double().numpy() / 0.5, 100)
    s_b = torch.cat([b[0][:, None], b[1]], 1).double().numpy() / 0.5
    want, _ = nce_reference(s_b, 100, z=0.9 * z1 + 0.1 * zb)
    assert math.isclose(crit(*b).item(), want, rel_tol=1e-5)


def test_infonce_is_softmax_cross_entropy() -> None:
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.rand(5, generator=g), torch.rand(5, 30, generator=g)
    s = torch.cat([pos[:, None], neg], 1).double().numpy() / 0.07
    want = np.mean(np.log(np.exp(s).sum(1)) - s[:, 0])
    assert math.isclose(InfoNCELoss(0.07)(pos, neg).item(), want, rel_tol=1e-6)


def test_pirl_loss_mixes_terms_with_lambda() -> None:
    bank = MemoryBank(50, dim=8, seed=0)
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    gz = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    idx = torch.tensor([0, 3, 7, 9])

    def value(lam: float) -> float:
        crit = PirlLoss(bank, num_negatives=20, temperature=0.1, lam=lam, loss="infonce")
        return crit(f, gz, idx, torch.Generator().manual_seed(5)).item()

    # Same generator -> lambda=0 draws the f term's negatives exactly as the mix does.
    crit = PirlLoss(bank, num_negatives=20, temperature=0.1, lam=1.0, loss="infonce")
    gen = torch.Generator().manual_seed(5)
    g_only = crit.term(gz, idx, gen).item()  # the patch term's draw comes first
    f_second = crit.term(f, idx, gen).item()
    assert math.isclose(value(0.5), 0.5 * f_second + 0.5 * g_only, rel_tol=1e-6)


def test_shared_negatives_use_one_draw_per_term_and_batch() -> None:
    bank = MemoryBank(200, dim=8, seed=1)
    f = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    idx = torch.tensor([4, 50, 7])
    crit = PirlLoss(
        bank, num_negatives=25, temperature=0.1, lam=0.0, loss="infonce", shared_negatives=True
    )
    got = crit(f, None, idx, torch.Generator().manual_seed(2)).item()
    neg_idx = bank.sample((25,), torch.Generator().manual_seed(2))  # the f term's draw
    m, z = bank.bank.double().numpy(), f.double().numpy()
    s = np.concatenate([(m[idx] * z).sum(1, keepdims=True), z @ m[neg_idx].T], 1) / 0.1
    want = np.mean(np.log(np.exp(s).sum(1)) - s[:, 0])
    assert math.isclose(got, want, rel_tol=1e-6)


def test_nce_includes_vissls_epsilon_at_imagenet_size() -> None:
    """|D| = 1,281,167 and N = 32,000: the eps in VISSL's denominators is worth ~0.15 nats."""
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.rand(2, generator=g) * 2 - 1, torch.rand(2, 32000, generator=g) * 2 - 1
    s = torch.cat([pos[:, None], neg], 1).double().numpy() / 0.07
    want, z = nce_reference(s, 1_281_167)
    without_eps, _ = nce_reference(s, 1_281_167, z=z, eps=0.0)
    got = NCELoss(1_281_167, 0.07)(pos, neg).item()
    assert got == pytest.approx(want, abs=2e-3)
    assert want - without_eps == pytest.approx(32000 * EPS / (32000 / 1_281_167), rel=0.05)


def test_pirl_terms_share_one_z_fixed_by_the_patch_term() -> None:
    """As VISSL's one NCEAverage: the first term computed (patches) sets Z, the image term
    reuses it; under NPID++ the image term sets it. Each term draws its own negatives."""
    bank = MemoryBank(400, dim=8, seed=2)
    f = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)))
    gz = torch.nn.functional.normalize(
        torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    )
    idx = torch.tensor([5, 17, 300])
    draws = [
        torch.randint(0, 400, (3, 30), generator=torch.Generator().manual_seed(k)) for k in (8, 9)
    ]
    crit = PirlLoss(bank, num_negatives=30, temperature=0.1, lam=0.5, loss="nce")
    queue = list(draws)
    crit.memory.sample = lambda shape, gen: queue.pop(0)
    got = crit(f, gz, idx).item()
    s_g, s_f = scores(bank, gz, idx, draws[0], 0.1), scores(bank, f, idx, draws[1], 0.1)
    loss_g, z = nce_reference(s_g, 400)
    loss_f, _ = nce_reference(s_f, 400, z=z)
    assert got == pytest.approx(0.5 * loss_g + 0.5 * loss_f, rel=1e-5)
    assert crit.criterion.log_z.item() == pytest.approx(math.log(z), rel=1e-6)
    npid = PirlLoss(bank, num_negatives=30, temperature=0.1, lam=0.0, loss="nce")
    npid.memory.sample = lambda shape, gen: draws[1]
    want_npid, z_f = nce_reference(s_f, 400)
    assert npid(f, None, idx).item() == pytest.approx(want_npid, rel=1e-5)
    assert npid.criterion.log_z.item() == pytest.approx(math.log(z_f), rel=1e-6)


def test_z_is_the_ranks_arithmetic_mean_as_vissl_gathers_it(monkeypatch) -> None:
    """VISSL's compute_partition_function averages the ranks' batch means of exp(s), then
    multiplies by |D|; faked here with two ranks whose means differ (the other rank's sum of
    exp(s) added by a stand-in all_reduce)."""
    import pirl.nce as nce

    g = torch.Generator().manual_seed(4)
    pos, neg = torch.rand(4, generator=g), torch.rand(4, 9, generator=g)
    other = np.exp(np.full((4, 10), 2.0) / 0.5).mean()  # the other rank's batch mean

    def all_reduce(t: torch.Tensor) -> None:
        t += other

    monkeypatch.setattr(nce, "distributed", lambda: True)
    monkeypatch.setattr(nce.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(nce.dist, "get_world_size", lambda: 2)
    crit = NCELoss(data_size=100, temperature=0.5)
    crit(pos, neg)
    mine = np.exp(torch.cat([pos[:, None], neg], 1).double().numpy() / 0.5).mean()
    assert crit.log_z.item() == pytest.approx(math.log((mine + other) / 2 * 100), rel=1e-12)
