"""Memory bank: one unit vector per training image, an EMA of its f-embedding."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INIT_ROWS = 1 << 16  # rows per independently seeded init chunk (same bank for any thread count)
PRIME = 1_000_000_007  # separates the init streams of the simulated ranks
DENSE_GPU = 1 << 30  # most (B, |D|) scores computed densely on a GPU (4 GB in float32)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sorted_uniform(
    high: int,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """i.i.d. uniform integers in [0, high), sorted along the last axis, without a sort: the
    order statistics of n uniforms are the partial sums of n + 1 exponential variables over
    their total (Renyi), and flooring is monotone. Linear time: 0.8 ms for 32,000 draws on
    one core where randint + sort takes 2.6 ms (5.6 vs 17.9 ms for 8 x 32,000)."""
    *lead, n = shape
    u = torch.rand(*lead, n + 1, dtype=torch.float64, generator=generator, device=device)
    sums = u.neg_().log1p_().neg_().cumsum_(-1)  # -log(1 - U) ~ Exp(1)
    scaled = sums[..., :n].mul_(sums[..., n:].reciprocal().mul_(high))
    return scaled.clamp_(max=high - 1).long()


class MemoryBank(nn.Module):
    """m_i <- normalize(momentum * m_i + (1 - momentum) * f(v_i)), no gradient (PIRL sec. 3.2).

    The starting bank is VISSL's on init_ranks GPUs: each of its ranks draws its own random
    unit rows (uniform in a cube, normalised) and the first forward averages the ranks' banks
    (`sync_memory`), so on 32 GPUs a starting row has norm about 1 / sqrt(32) = 0.18, which
    sets NCE's fixed Z (Z / |D| about 1.03, against 2.2 from unit rows). Every rank here builds
    that same average from the seed, whatever the world size: no communication.

    Under DDP every rank holds a full replica and applies the (index, f) updates gathered from
    all ranks in rank order, so the replicas stay identical. The bank may be stored in float16
    or bfloat16 (half the memory); every mix and normalisation is done in float32.
    """

    def __init__(
        self,
        size: int,
        dim: int = 128,
        momentum: float = 0.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        init_ranks: int = 1,
    ) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("bank", torch.empty(size, dim, dtype=dtype))

        def init(start: int) -> None:
            """Rows start .. start + INIT_ROWS: the mean of init_ranks independent unit rows,
            each uniform in [-1, 1) and normalised (chunks in parallel)."""
            n = min(INIT_ROWS, size - start)
            total = torch.zeros(n, dim)
            for r in range(init_ranks):  # rank 0's stream is the one a single bank always had
                g = torch.Generator().manual_seed(seed * 1_000_003 + start // INIT_ROWS + r * PRIME)
                rows = torch.empty(n, dim).uniform_(-1, 1, generator=g)
                total += rows.div_(rows.norm(dim=1, keepdim=True))
            self.bank[start : start + n] = total.div_(init_ranks)

        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            list(pool.map(init, range(0, size, INIT_ROWS)))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Negative indices drawn uniformly from the whole data set, in one call, on the
        generator's device (a CUDA generator keeps a large per-sample draw on the GPU); sorted
        along the last axis when scores will gather rows: the loss does not depend on the
        negatives' order, and sorted rows gather faster (the dense form reads no rows)."""
        device = generator.device if generator is not None else torch.device("cpu")
        if len(shape) == 2 and self.dense(*shape):
            idx = torch.randint(0, self.size, shape, generator=generator, device=device)
        else:
            idx = sorted_uniform(self.size, shape, generator, device)
        return idx.to(self.bank.device)

    def dense(self, batch: int, n: int) -> bool:
        """Whether scores computes (batch, n) per-sample negatives from all (batch, |D|)
        scores: when the bank is no larger than n or, on a GPU with a float32 bank, when those
        fit DENSE_GPU (streaming the bank through one matrix product beats batch * n random
        row reads there: BENCHMARKS.md; a 16-bit bank would need a float32 copy of itself)."""
        on_gpu = self.bank.is_cuda and self.bank.dtype == torch.float32
        return self.size <= n or (on_gpu and batch * self.size <= DENSE_GPU)

    def scores(self, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """<m_j, z[b]> in z's dtype: idx (B, N) per-sample negatives, or (N,) one draw shared
        by the batch (one gather, one (B, N) product). Per sample: one (B, |D|) product when
        self.dense says so, else a blocked gather + bmm whose backward pass is one fused
        gather-and-sum (embedding_bag), keeping only idx (not B*N gathered rows)."""
        if idx.dim() == 1:
            return z @ self.bank.index_select(0, idx).to(z.dtype).T
        if self.dense(*idx.shape):
            return (z @ self.bank.to(z.dtype).T).gather(1, idx)
        budget = (1 << 27) if z.is_cuda else (1 << 20)  # gathered values held at once
        return _GatherScores.apply(z, self.bank, idx, budget)

    @torch.no_grad()
    def update(self, idx: torch.Tensor, feats: torch.Tensor) -> None:
        """EMA update in place; gathers every rank's updates first under DDP."""
        feats = feats.detach().to(self.bank.dtype)
        if distributed():
            world = dist.get_world_size()
            sizes = [torch.zeros(1, dtype=torch.long, device=idx.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([idx.numel()], device=idx.device))
            n_max = int(max(s.item() for s in sizes))
            pad_idx = torch.zeros(n_max, dtype=idx.dtype, device=idx.device)
            pad_feat = torch.zeros(n_max, feats.shape[1], dtype=feats.dtype, device=feats.device)
            pad_idx[: idx.numel()], pad_feat[: idx.numel()] = idx, feats
            all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
            all_feat = [torch.empty_like(pad_feat) for _ in range(world)]
            dist.all_gather(all_idx, pad_idx)
            dist.all_gather(all_feat, pad_feat)
            idx = torch.cat([i[: int(s.item())] for i, s in zip(all_idx, sizes, strict=True)])
            feats = torch.cat([f[: int(s.item())] for f, s in zip(all_feat, sizes, strict=True)])
        mixed = self.momentum * self.bank[idx].float() + (1 - self.momentum) * feats.float()
        self.bank[idx] = F.normalize(mixed, dim=1).to(self.bank.dtype)


def _blocks(batch: int, n: int, dim: int, budget: int) -> list[tuple[slice, slice]]:
    """(samples, negatives) blocks of at most `budget` gathered values (at least one row)."""
    if n * dim <= budget:
        step = budget // (n * dim)
        return [(slice(b, b + step), slice(0, n)) for b in range(0, batch, step)]
    rows = max(1, budget // dim)
    return [(slice(b, b + 1), slice(r, r + rows)) for b in range(batch) for r in range(0, n, rows)]


class _GatherScores(torch.autograd.Function):
    """s[b, j] = <bank[idx[b, j]], z[b]> block by block into one reused buffer. The backward
    pass, grad_z[b] = sum_j grad[b, j] * bank[idx[b, j]], is embedding_bag's weighted sum:
    it reads the rows again without writing them anywhere (saving them would take 4 GB per
    term at batch 256 and 32,000 negatives), and on the CPU faster than a second blocked
    gather + bmm (FBGEMM's kernel prefetches the rows)."""

    @staticmethod
    def forward(ctx, z, bank, idx, budget):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.save_for_backward(bank, idx)
        out = z.new_empty(idx.shape)
        for bs, ns, rows in _gathered(bank, idx, budget, z.dtype):
            if rows.shape[0] == 1:
                torch.mv(rows[0], z[bs][0], out=out[bs, ns][0])
            else:
                out[bs, ns] = torch.bmm(rows, z[bs].unsqueeze(2)).squeeze(2)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        bank, idx = ctx.saved_tensors
        batch, n = idx.shape
        offsets = torch.arange(0, batch * n, n, device=idx.device)
        # the weights take the bank's dtype; scaled to at most 1 so float16 keeps small ones
        scale = grad.abs().amax().clamp_min(torch.finfo(grad.dtype).tiny)
        grad_z = F.embedding_bag(
            idx.reshape(-1),
            bank,
            offsets,
            mode="sum",
            per_sample_weights=(grad / scale).reshape(-1).to(bank.dtype),
        )
        return grad_z.to(grad.dtype) * scale, None, None, None


def _gathered(bank: torch.Tensor, idx: torch.Tensor, budget: int, dtype: torch.dtype):
    """Yield (samples, negatives, rows (b, n, dim) in dtype) per block, the rows living in
    buffers allocated once (fresh large allocations cost page faults on every block)."""
    dim = bank.shape[1]
    blocks = _blocks(*idx.shape, dim, budget)
    most = max((len(range(*b.indices(idx.shape[0]))) * (n.stop - n.start)) for b, n in blocks)
    buf = bank.new_empty(most, dim)
    cast = None if bank.dtype == dtype else torch.empty(most, dim, dtype=dtype, device=bank.device)
    for bs, ns in blocks:
        ids = idx[bs, ns]
        flat = ids.reshape(-1)
        rows = torch.index_select(bank, 0, flat, out=buf[: len(flat)])
        if cast is not None:
            rows = cast[: len(flat)].copy_(rows)
        yield bs, ns, rows.view(*ids.shape, dim)
