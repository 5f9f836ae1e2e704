"""Linear probes on frozen features: VOC07 SVMs (all (class, cost) pairs as one batched problem)
and the BatchNorm + Linear classifier of the ImageNet, Places205 and iNat18 benchmarks.

SVM: each problem is LinearSVC's primal (squared hinge, L2, bias as a regularised constant feature
with intercept_scaling=1):  0.5 ||w||^2 + sum_i C cw_i max(0, 1 - y_i (w.x_i + b))^2,
cw_i = 2 for positives. When there are fewer samples than dims the problem is solved exactly
in the span of the samples, w = X^T beta, from K = X X^T + 1 alone: it is computed once for
trainval, the 3 CV folds use its sub-blocks, and scores are K_eval beta (CV) or
x.(X^T beta) + sum(beta) (test). The solver is truncated Newton with conjugate gradients and an
exact line search (Chapelle 2007, "Training a support vector machine in the primal"), batched
over all classes; CG runs in the K inner product so each iteration costs one (n x n) @ (n x 20)
product. Otherwise it runs on the features with an appended constant 1.

The costs are solved in ascending order, each warm-started from the previous solution (all
classes batched), which needs several times fewer matrix products than solving all (class,
cost) pairs from zero at once, and more than pays for the narrower (20- instead of
220-column) products.

Protocol (VISSL's VOC07 SVM): features L2-normalised, costs COSTS, 3-fold CV by AP per
class, refit on trainval with the best cost (the smallest on ties), mAP on test; difficult
(0) labels are negatives in training and ignored at test. Differences from VISSL, kept for
speed: the folds are the same contiguous thirds (sklearn's KFold(3)) for every class, where
VISSL's cross_val_score stratifies per class; CV scores the VOC envelope AP, not sklearn's
step AP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)


def envelope_ap(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the monotone precision envelope (VOC 2010+) per column; label 0 is ignored.

    scores and labels are (n, P); labels in {1, 0, -1}. A column without positives gets 0.
    """
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    lab = torch.gather(labels, 0, order)
    tp = (lab > 0).to(scores.dtype).cumsum(0)
    fp = (lab < 0).to(scores.dtype).cumsum(0)
    prec = tp / (tp + fp).clamp_min(1)
    envelope = torch.flip(torch.cummax(torch.flip(prec, [0]), dim=0).values, [0])
    pos = (lab > 0).to(scores.dtype)
    return (envelope * pos).sum(0) / pos.sum(0).clamp_min(1)


@dataclass
class SolverStats:
    """How hard the solve was: Newton iterations and CG iterations (max over the batch)."""

    newton: int = 0
    cg: int = 0
    products: int = 0  # matrix-vector products (features or Gram) summed over the batch


def solve_squared_hinge(
    feats: torch.Tensor,
    y: torch.Tensor,
    cw: torch.Tensor,
    tol: float = 1e-4,
    max_newton: int = 50,
    max_cg: int = 100,
    stats: SolverStats | None = None,
    z0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise 0.5||z||^2 + sum_i cw_ip max(0, 1 - y_ip f_i.z_p)^2 for every column p at once.

    feats (n, r), y (n, P) in {+1, -1}, cw (n, P) = cost times class weight. Returns z (P, r).
    Stops a column when its gradient norm falls below tol times the norm at z = 0.
    """
    n, r = feats.shape
    p_count = y.shape[1]
    g0 = ((2 * cw * y).T @ feats).norm(dim=1).clamp_min(1e-30)  # gradient norm at z = 0
    z = feats.new_zeros(p_count, r) if z0 is None else z0.clone()
    m = feats @ z.T  # f_i . z_p
    todo = torch.arange(p_count, device=feats.device)
    for it in range(max_newton):
        yt, ct, zt, mt = y[:, todo], cw[:, todo], z[todo], m[:, todo]
        slack = 1 - yt * mt
        act = (slack > 0).to(feats.dtype)
        d = 2 * ct * act  # Hessian weights
        grad = zt - ((d * slack * yt).T @ feats)
        gnorm = grad.norm(dim=1)
        keep = gnorm > tol * g0[todo]
        if not keep.any():
            break
        todo, yt, ct, zt, mt = todo[keep], yt[:, keep], ct[:, keep], zt[keep], mt[:, keep]
        slack, d, grad = slack[:, keep], d[:, keep], grad[keep]
        forcing = (gnorm[keep] / g0[todo]).sqrt().clamp(max=0.5)
        step, fstep, n_cg = _cg(feats, d, grad, max_cg, forcing)
        t = _line_search((zt * step).sum(1), (step * step).sum(1), mt, fstep, yt, ct)
        z[todo] = zt + t[:, None] * step
        m[:, todo] = mt + t[None, :] * fstep
        if stats is not None:
            stats.newton = it + 1
            stats.cg = max(stats.cg, n_cg)
            stats.products += len(todo) * (2 * n_cg + 3)
    return z


def _cg(
    feats: torch.Tensor,
    d: torch.Tensor,
    grad: torch.Tensor,
    max_cg: int,
    forcing: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve (I + F^T D F) s = -g per column by CG; also return F s for the line search.

    No preconditioner: Jacobi scaling is not invariant to the choice of basis for the span of
    the samples and made the Cholesky-basis problem several times slower to solve."""
    s = torch.zeros_like(grad)
    fs = feats.new_zeros(feats.shape[0], grad.shape[0])
    res = -grad
    direction = res.clone()
    rz = (res * res).sum(1)
    stop = forcing * grad.norm(dim=1)  # truncated Newton (Eisenstat-Walker forcing)
    it = 0
    while it < max_cg:
        it += 1
        fd = feats @ direction.T
        hd = direction + (d * fd).T @ feats
        alpha = rz / (direction * hd).sum(1).clamp_min(1e-30)
        alpha = torch.where(res.norm(dim=1) > stop, alpha, torch.zeros_like(alpha))
        s = s + alpha[:, None] * direction
        fs = fs + alpha[None, :] * fd
        res = res - alpha[:, None] * hd
        if (res.norm(dim=1) <= stop).all():
            break
        rz_new = (res * res).sum(1)
        direction = res + (rz_new / rz.clamp_min(1e-30))[:, None] * direction
        rz = rz_new
    return s, fs, it


def _line_search(
    zs: torch.Tensor,
    ss: torch.Tensor,
    m: torch.Tensor,
    fs: torch.Tensor,
    y: torch.Tensor,
    cw: torch.Tensor,
    steps: int = 8,
) -> torch.Tensor:
    """Exact minimiser of the piecewise-quadratic objective along z + t s (1-D Newton).

    zs = z.s and ss = s.s per column (in w space), m and fs the scores of z and s."""
    ym, yfs = y * m, y * fs
    t = torch.ones_like(zs)
    for _ in range(steps):
        slack = 1 - ym - t[None, :] * yfs
        act = (slack > 0).to(m.dtype)
        d1 = zs + t * ss - 2 * (cw * act * slack * yfs).sum(0)
        d2 = ss + 2 * (cw * act * yfs * yfs).sum(0)
        t = t - d1 / d2.clamp_min(1e-30)
    return t


def solve_kernel_squared_hinge(
    gram: torch.Tensor,
    y: torch.Tensor,
    cw: torch.Tensor,
    tol: float = 1e-4,
    max_newton: int = 50,
    max_cg: int = 100,
    stats: SolverStats | None = None,
    beta0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same problems as solve_squared_hinge with w = X^T beta, from the Gram matrix alone.

    gram (n, n) = X X^T + 1, y and cw (n, P) as there. Returns beta (n, P); scores are
    gram_eval @ beta. The iterates are those of Newton-CG in the Cholesky basis (z = L^T beta),
    but CG runs in the K inner product and tracks K times its residual and direction, so an
    iteration costs ONE product with the Gram matrix instead of two with L, and no
    factorisation is needed: the CV folds use sub-blocks of one Gram matrix as they are.
    """
    n, p_count = y.shape
    beta = gram.new_zeros(n, p_count) if beta0 is None else beta0.clone()
    out = gram @ beta  # K beta: the scores on the training points
    cy = 2 * cw * y
    g0 = (cy * (gram @ cy)).sum(0).clamp_min(1e-30).sqrt()  # gradient norm at beta = 0
    todo = torch.arange(p_count, device=gram.device)
    for it in range(max_newton):
        bt, ot, yt, ct = beta[:, todo], out[:, todo], y[:, todo], cw[:, todo]
        slack = (1 - yt * ot).clamp_min(0)
        grad = bt - 2 * ct * slack * yt  # the w-space gradient is X^T grad
        kgrad = gram @ grad
        gnorm = (grad * kgrad).sum(0).clamp_min(0).sqrt()
        keep = gnorm > tol * g0[todo]
        if not keep.any():
            break
        todo, bt, ot, yt, ct = todo[keep], bt[:, keep], ot[:, keep], yt[:, keep], ct[:, keep]
        slack, grad, kgrad, gnorm = slack[:, keep], grad[:, keep], kgrad[:, keep], gnorm[keep]
        forcing = (gnorm / g0[todo]).sqrt().clamp(max=0.5)
        d = 2 * ct * (slack > 0).to(gram.dtype)  # Hessian weights
        step, kstep, n_cg = _kernel_cg(gram, d, grad, kgrad, max_cg, forcing * gnorm)
        t = _line_search((ot * step).sum(0), (step * kstep).sum(0), ot, kstep, yt, ct)
        beta[:, todo] = bt + t[None, :] * step
        out[:, todo] = ot + t[None, :] * kstep
        if stats is not None:
            stats.newton = it + 1
            stats.cg = max(stats.cg, n_cg)
            stats.products += len(todo) * (n_cg + 1)
    return beta


def _kernel_cg(
    gram: torch.Tensor,
    d: torch.Tensor,
    grad: torch.Tensor,
    kgrad: torch.Tensor,
    max_cg: int,
    stop: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve (I + D K) s = -grad per column by CG in the K inner product; also return K s.

    This is CG on (I + L^T D L) in the Cholesky basis written for beta-space vectors; the
    residual and direction carry their K products, updated with the one new product K D K p."""
    s = torch.zeros_like(grad)
    ks = torch.zeros_like(grad)
    res, kres = -grad, -kgrad
    direction, kdir = res, kres
    rr = (res * kres).sum(0)
    it = 0
    while it < max_cg:
        it += 1
        q = d * kdir
        kq = gram @ q
        alpha = rr / ((direction * kdir).sum(0) + (kdir * q).sum(0)).clamp_min(1e-30)
        alpha = torch.where(rr.clamp_min(0).sqrt() > stop, alpha, torch.zeros_like(alpha))
        s = s + alpha * direction
        ks = ks + alpha * kdir
        res = res - alpha * (direction + q)
        kres = kres - alpha * (kdir + kq)
        rr_new = (res * kres).sum(0)
        if (rr_new.clamp_min(0).sqrt() <= stop).all():
            break
        ratio = rr_new / rr.clamp_min(1e-30)
        direction, kdir = res + ratio * direction, kres + ratio * kdir
        rr = rr_new
    return s, ks, it


def fit_path(
    x_train: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    costs: tuple[float, ...],
    x_eval: torch.Tensor,
    gram: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    tol: float = 1e-4,
    stats: SolverStats | None = None,
) -> torch.Tensor:
    """Train every column's SVM at each cost (ascending, each warm-started from the previous
    one) and return the scores w.x + b on x_eval, shape (len(costs), m, columns).

    y (n, K) in {+1, -1}; weight (n, K) the class weights; gram optionally the
    (train x train, eval x train or None) blocks of X X^T + 1 when already computed. Warm
    starting along the cost path needs several times fewer Newton-CG products than cold starts.
    """
    n, dim = x_train.shape
    kernel = n <= dim + 1
    if kernel and gram is None:
        gram = (x_train @ x_train.T + 1, None)
    feats = None if kernel else torch.cat([x_train, x_train.new_ones(n, 1)], 1)
    out = x_eval.new_empty(len(costs), len(x_eval), y.shape[1])
    z = None
    for i, cost in enumerate(costs):
        if kernel:
            z = solve_kernel_squared_hinge(gram[0], y, weight * cost, tol, stats=stats, beta0=z)
            # w = X^T beta, b = sum(beta): cheaper than an eval x train Gram block
            out[i] = x_eval @ (x_train.T @ z) + z.sum(0) if gram[1] is None else gram[1] @ z
        else:
            z = solve_squared_hinge(feats, y, weight * cost, tol=tol, stats=stats, z0=z)
            out[i] = x_eval @ z[:, :-1].T + z[:, -1]
    return out


def _gram(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """X X^T + 1 from the lower block-triangle only, mirrored: ~40% fewer flops than X @ X.T."""
    n = len(x)
    gram = x.new_empty(n, n)
    for i in range(0, n, block):
        j = min(i + block, n)
        gram[i:j, :j] = x[i:j] @ x[:j].T
        gram[:i, i:j] = gram[i:j, :i].T
    return gram.add_(1)


def kfold(n: int, folds: int = 3) -> list[np.ndarray]:
    """sklearn's KFold(folds), unshuffled: contiguous blocks, the first n % folds one longer."""
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(edges[i], edges[i + 1]) for i in range(folds)]


def voc07_svm(
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    costs: tuple[float, ...] = COSTS,
    folds: int = 3,
    pos_weight: float = 2.0,
    device: str | torch.device = "cpu",
    stats: SolverStats | None = None,
) -> dict:
    """The VOC07 SVM protocol on precomputed features; labels (n, classes) in {1, 0, -1}.

    Returns mAP (percent), per-class test AP (percent) and the chosen cost per class.
    """
    dev = torch.device(device)
    xtr, xte = (
        torch.nn.functional.normalize(
            torch.from_numpy(np.array(x, dtype=np.float32)).to(dev), dim=1
        )
        for x in (train_x, test_x)
    )
    ytr_raw = torch.as_tensor(np.asarray(train_y)).to(dev)
    yte = torch.as_tensor(np.asarray(test_y)).to(dev).float()
    ytr = torch.where(ytr_raw > 0, 1.0, -1.0)  # difficult counts as negative in training
    n, k = ytr.shape
    costs = tuple(sorted(costs))
    weight = torch.where(ytr > 0, pos_weight, 1.0)
    small = n <= xtr.shape[1] + 1
    gram = _gram(xtr) if small else None
    cv = torch.zeros(len(costs), k, device=dev)
    for val in kfold(n, folds):
        mask = np.ones(n, dtype=bool)
        mask[val] = False
        tr = torch.as_tensor(np.flatnonzero(mask), device=dev)
        va = torch.as_tensor(val, device=dev)
        blocks = (gram[tr][:, tr], gram[va][:, tr]) if small else None
        scores = fit_path(xtr[tr], ytr[tr], weight[tr], costs, xtr[va], blocks, stats=stats)
        for i in range(len(costs)):
            cv[i] += envelope_ap(scores[i], ytr[va])
    best = cv.argmax(0)  # first maximum: the smallest cost on ties
    blocks = (gram, None) if small else None
    used = costs[: int(best.max()) + 1]
    scores = fit_path(xtr, ytr, weight, used, xte, blocks, stats=stats)
    chosen = scores[best, :, torch.arange(k, device=dev)].T  # (m, k): each class at its cost
    ap = envelope_ap(chosen, yte) * 100
    return {
        "mAP": float(ap.mean()),
        "ap": [float(a) for a in ap],
        "cost": [costs[int(b)] for b in best],
    }


# (epochs, LR milestones) of the published linear benchmarks (VISSL / Goyal et al. 2019).
SCHEDULES = {
    "imagenet": (28, (8, 16, 24)),
    "places205": (14, (4, 8, 12)),
    "inat18": (84, (24, 48, 72)),
}


def scaled_schedule(benchmark: str, epochs: int | None = None) -> tuple[int, tuple[int, ...]]:
    """The published schedule, or the same shape squeezed into fewer epochs (milestones scaled)."""
    full, milestones = SCHEDULES[benchmark]
    if epochs is None or epochs == full:
        return full, milestones
    scaled = sorted({max(1, min(epochs - 1, round(m * epochs / full))) for m in milestones})
    return epochs, tuple(m for m in scaled if 0 < m < epochs)


class LinearProbe(torch.nn.Module):
    """VISSL's eval_mlp head: BatchNorm2d with affine over the pooled map's channels, flatten,
    Linear. Rows are (channels, h, w) maps flattened channel-major (pirl.features.pool_stage),
    so each channel's statistics are shared by its h x w positions. eps and momentum are
    VISSL's (PyTorch's) defaults, and the Linear keeps PyTorch's initialisation, which VISSL's
    MLP head does not replace (its PARAMS_MULTIPLIER is 1)."""

    def __init__(self, channels: int, dim: int, classes: int) -> None:
        super().__init__()
        if dim % channels:
            raise ValueError(f"feature length {dim} is not a multiple of {channels} channels")
        self.channels = channels
        self.bn = torch.nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
        self.fc = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = x.reshape(len(x), self.channels, -1, 1)
        return self.fc(self.bn(maps).flatten(1))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """VISSL's linear benchmark optimiser groups (regularize_bn False, regularize_bias True):
        weight decay on the Linear's weight and bias, none on the BatchNorm affine."""
        return [
            {"params": list(self.fc.parameters()), "weight_decay": weight_decay},
            {"params": list(self.bn.parameters()), "weight_decay": 0.0},
        ]


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[int]:
    """How many rows have the label among their k best logits, for each k (capped at classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, : min(k, logits.shape[1])].any(1).sum()) for k in ks]


Batches = Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]


def train_probes(
    train_batches: Callable[[int], Batches],
    test_batches: Callable[[], Batches],
    shapes: Mapping[str, tuple[int, int]],
    classes: int,
    epochs: int,
    milestones: tuple[int, ...],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    log: Callable[[str, dict], None] | None = None,
    save: Callable[[dict], None] | None = None,
    state: dict | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Train one BN + Linear probe per layer with the published recipe (SGD Nesterov 0.9,
    wd 5e-4 but not on BN, LR 0.01 per 256, 10x decay at the milestones) on shared batches,
    so one pass of the trunk feeds every layer's probe; per layer, the test top-1/top-5 (%)
    after every epoch (the last is the result) and the trained probe.

    shapes maps a layer to (dim, channels): features `dim` long, (channels, h, w) maps flattened
    channel-major. train_batches(epoch) yields that epoch's ({layer: features}, labels) batches;
    test_batches() the test set once. Each probe starts from torch.manual_seed(seed), whatever
    the other layers, so a layer trained with others equals it trained alone. After each epoch
    log(layer, row) records it and save(state) receives what `state` resumes from (the probes,
    optimisers, schedules, epoch and torch's RNG, which an augmented epoch draws from).
    """
    probes, opts, scheds = {}, {}, {}
    for layer, (dim, channels) in shapes.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            probes[layer] = LinearProbe(channels, dim, classes).to(device)
        opts[layer] = torch.optim.SGD(
            probes[layer].param_groups(5e-4),
            lr=0.01 * batch_size / 256,
            momentum=0.9,
            nesterov=True,
        )
        scheds[layer] = torch.optim.lr_scheduler.MultiStepLR(opts[layer], list(milestones), 0.1)
    start = 0
    if state is not None:
        for layer in shapes:
            probes[layer].load_state_dict(state["probes"][layer])
            opts[layer].load_state_dict(state["optimizers"][layer])
            scheds[layer].load_state_dict(state["schedulers"][layer])
        start = int(state["epoch"])
        torch.set_rng_state(state["rng"])
    results = dict(state["results"]) if state is not None else {}
    for epoch in range(start, epochs):
        totals, seen = dict.fromkeys(shapes, 0.0), 0
        for probe in probes.values():
            probe.train()
        for feats, labels in train_batches(epoch):
            labels = labels.to(device)
            for layer, probe in probes.items():
                loss = torch.nn.functional.cross_entropy(
                    probe(feats[layer].to(device).float()), labels
                )
                opts[layer].zero_grad(set_to_none=True)
                loss.backward()
                opts[layer].step()
                totals[layer] += loss.item() * len(labels)
            seen += len(labels)
        for sched in scheds.values():
            sched.step()
        results = _evaluate(probes, test_batches, device)
        for layer in shapes:
            row = {
                "epoch": epoch + 1,
                "loss": totals[layer] / max(seen, 1),
                "lr": opts[layer].param_groups[0]["lr"],
                "val_top1": results[layer]["top1"],
                "val_top5": results[layer]["top5"],
            }
            if log is not None:
                log(layer, row)
        if save is not None:
            save(
                {
                    "probes": {k: p.state_dict() for k, p in probes.items()},
                    "optimizers": {k: o.state_dict() for k, o in opts.items()},
                    "schedulers": {k: s.state_dict() for k, s in scheds.items()},
                    "epoch": epoch + 1,
                    "rng": torch.get_rng_state(),
                    "results": results,
                }
            )
    return {layer: {**results[layer], "probe": probes[layer]} for layer in shapes}


def _evaluate(
    probes: Mapping[str, LinearProbe], test_batches: Callable[[], Batches], device
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 (%) of every probe on one pass over the test batches."""
    hits, n = {layer: [0, 0] for layer in probes}, 0
    for probe in probes.values():
        probe.eval()
    with torch.no_grad():
        for feats, labels in test_batches():
            labels = labels.to(device)
            for layer, probe in probes.items():
                c = topk_correct(probe(feats[layer].to(device).float()), labels)
                hits[layer] = [a + b for a, b in zip(hits[layer], c, strict=True)]
            n += len(labels)
    return {
        layer: {"top1": 100 * h[0] / max(n, 1), "top5": 100 * h[1] / max(n, 1)}
        for layer, h in hits.items()
    }
