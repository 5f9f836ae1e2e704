"""The GPU paths against the CPU paths that the rest of the suite checks independently.

CI has no GPU, so these are skipped there; run them on a GPU machine with
`python -m pytest tests/test_cuda.py` (BENCHMARKS.md says when they last ran).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pirl import augment as A
from pirl.jigsaw import JigsawGeometry
from pirl.memory import MemoryBank
from pirl.nce import PirlLoss
from pirl.pretrain import PretrainConfig, prefetched, pretrain
from tests.conftest import encoded_and_cropped

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# --decode gpu refuses other allocators (pirl.augment.require_gpu_decode)
NATIVE_ALLOCATOR = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_allocator_backend() != "native",
    reason="DeviceDecode needs PyTorch's native CUDA allocator",
)


@pytest.mark.parametrize(
    "spec",
    [A.PhotometricSpec(photometric=0), A.PhotometricSpec(0, 0, 0, 0)],
    ids=["jitter", "photometric-ops"],
)
def test_batch_augment_on_the_gpu_equals_the_cpu(spec: A.PhotometricSpec) -> None:
    """Same generator, same crops: positional schedule + gather cut on the GPU, grouped
    schedule + slices on the CPU (each checked against torchvision in test_augment.py). The
    jitter and VISSL's random photometric ops apart: the devices' float noise in the jitter
    would move the odd pixel across a posterize edge (a whole bin) or the solarize threshold,
    while with the jitter off both devices give the photometric ops the same 8-bit levels."""
    geo = JigsawGeometry.for_image_size(96)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 96, 96), dtype=torch.uint8, generator=gen)
    sources = torch.randint(0, 256, (16, 3, 108, 108), dtype=torch.uint8, generator=gen)
    aug = A.BatchAugment(geo, spec)
    want = aug(images, sources, torch.Generator().manual_seed(1))
    got = aug(images.to(CUDA), sources.to(CUDA), torch.Generator().manual_seed(1))
    assert got[0].is_cuda and got[1].is_cuda and torch.equal(got[2], want[2])
    for w, g in zip(want[:2], got[:2], strict=True):
        torch.testing.assert_close(g.cpu(), w, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("shared", "dense"), [(False, True), (False, False), (True, True)])
def test_loss_and_gradient_on_the_gpu_equal_the_cpu(shared: bool, dense: bool, monkeypatch) -> None:
    """Negatives drawn on the CPU and moved: the GPU's dense scores (or, with DENSE_GPU 0,
    its blocked gather) against the CPU's blocked gather, and both against the plain gather
    + bmm form computed in float64."""
    if not dense:
        monkeypatch.setattr("pirl.memory.DENSE_GPU", 0)
    torch.manual_seed(0)
    memory = MemoryBank(5000, 16, seed=0)
    z = F.normalize(torch.randn(6, 16), dim=1)
    idx = memory.sample((700,) if shared else (6, 700), torch.Generator().manual_seed(2))
    grads = []
    for device in ("cpu", "cuda"):
        mem = MemoryBank(5000, 16, seed=0).to(device)
        zz = z.to(device, copy=True).requires_grad_()
        mem.scores(zz, idx.to(device)).square().sum().backward()
        grads.append(zz.grad.cpu())
    bank = memory.bank.double()
    zd = z.double().requires_grad_()
    rows = bank[idx].expand(6, -1, -1) if shared else bank[idx]
    torch.bmm(rows, zd.unsqueeze(2)).square().sum().backward()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1].double(), zd.grad, atol=1e-5, rtol=1e-5)


def test_negatives_drawn_on_the_gpu_are_uniform_and_seeded() -> None:
    memory = MemoryBank(1000, 8, seed=0).to(CUDA)
    draw = memory.sample((64, 5000), torch.Generator(CUDA).manual_seed(3))
    again = memory.sample((64, 5000), torch.Generator(CUDA).manual_seed(3))
    assert draw.device.type == "cuda" and torch.equal(draw, again)
    shared = memory.sample((5000,), torch.Generator(CUDA).manual_seed(3))
    assert bool((shared[1:] >= shared[:-1]).all())  # sorted for the gather
    counts = torch.bincount(draw.flatten().cpu(), minlength=1000).double()
    expected = draw.numel() / 1000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 999 + 5 * math.sqrt(2 * 999)  # uniform: chi-square with 999 dof


def test_pirl_loss_on_the_gpu_matches_the_cpu_with_the_same_negatives() -> None:
    """The devices draw differently (the GPU's dense path needs no sorted draw), so both
    losses get one fixed set of negatives; the GPU scores them densely, the CPU by gather."""
    bank = MemoryBank(3000, 32, seed=1)
    f = F.normalize(torch.randn(8, 32, generator=torch.Generator().manual_seed(5)), dim=1)
    g = F.normalize(torch.randn(8, 32, generator=torch.Generator().manual_seed(6)), dim=1)
    idx = torch.arange(8)
    negatives = bank.sample((8, 512), torch.Generator().manual_seed(7))
    losses = []
    for device in ("cpu", "cuda"):
        crit = PirlLoss(MemoryBank(3000, 32, seed=1).to(device), 512, 0.07, 0.5, "nce")
        crit.memory.bank.copy_(bank.bank)
        crit.memory.sample = lambda shape, gen, d=device: negatives.to(d)
        losses.append(float(crit(f.to(device), g.to(device), idx.to(device))))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_pretrain_on_the_gpu_with_amp_runs_and_resumes(tmp_path) -> None:
    """Two epochs on the embedded set with bf16 autocast and channels_last, then a third by
    --resume: finite losses, the bank still unit vectors, step count continued."""
    cfg = PretrainConfig(out=str(tmp_path / "run"), epochs=2, device="cuda", num_workers=0)
    trainer = pretrain(cfg)
    assert trainer.step > 0 and trainer.memory.bank.device.type == "cuda"
    norms = trainer.memory.bank.float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
    steps = trainer.step
    more = {"epochs": 3, "resume": True, "allow_change": ("epochs",)}
    resumed = pretrain(PretrainConfig(**{**cfg.__dict__, **more}))
    assert resumed.epoch == 3 and resumed.step == steps * 3 // 2
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 4 and all(math.isfinite(float(r.split(",")[2])) for r in metrics[1:])


def test_prefetched_batches_arrive_on_the_gpu_unchanged() -> None:
    """Pinned 64 MB batches, so the side-stream copies really run asynchronously: without
    the wait on each copy's event the main stream would read a half-copied batch."""
    gen = torch.Generator().manual_seed(0)

    def batch(start: int) -> tuple:
        images = torch.randint(0, 256, (64, 3, 512, 682), generator=gen, dtype=torch.uint8)
        return ((images.pin_memory(),), torch.arange(start, start + 64).pin_memory())

    items = [(batch(0), 0), (None, 4), (batch(64), 1), (batch(128), 0)]
    got = []
    for moved, skipped in prefetched(items, CUDA):
        # consume on the main stream at once, as a training step would
        got.append((None if moved is None else (moved[0][0].sum(), moved[1].sum()), skipped))
    assert [s for _, s in got] == [0, 4, 1, 0] and got[1][0] is None
    for (want, _), (sums, _) in zip(items[::2] + items[3:], got[::2] + got[3:], strict=True):
        assert int(sums[0]) == int(want[0][0].sum()) and int(sums[1]) == int(want[1].sum())


@NATIVE_ALLOCATOR
def test_gpu_decode_and_crops_equal_the_cpu_path(tmp_path) -> None:
    """nvJPEG + the float resize on the device against libjpeg-turbo + resize_u8 (the CPU
    path, itself PIL's pixels: test_decode.py), same boxes, for 4:2:0, 4:4:4 and grey
    baseline JPEGs; a CMYK JPEG, a progressive JPEG and a PNG decoded by the worker."""
    from PIL import Image
    from skimage import data as skdata

    img = Image.fromarray(skdata.chelsea())
    img.save(tmp_path / "a.jpg", quality=90)
    img.save(tmp_path / "b.jpg", progressive=True)
    img.convert("CMYK").save(tmp_path / "c.jpg")
    img.resize((200, 150)).save(tmp_path / "d.png")
    img.save(tmp_path / "e.jpg", quality=90, subsampling=0)
    img.convert("L").save(tmp_path / "f.jpg", quality=90)
    items, want, crop = encoded_and_cropped(tmp_path)
    assert [e.data is not None for e in items] == [True, False, False, False, True, True]
    decode = A.DeviceDecode(crop)
    images, sources = decode(items, CUDA)
    assert decode.refused == 0  # nvJPEG took all three JPEGs sent to it (none fell back)
    assert images.is_cuda and images.dtype == torch.uint8
    for got, w in ((images, [x[0] for x in want]), (sources, [x[1] for x in want])):
        diff = (got.cpu().int() - torch.stack(w).int()).abs()
        assert diff.float().mean() < 0.5 and torch.quantile(diff.float(), 0.99) <= 3, diff.max()


def overwritten_rounds(decode, items: list, rounds: int = 20) -> int:
    """Rounds in which memory freed on the training stream while kernels that read it were
    still queued (reductions behind a long sleep, as the backward in training) lost its
    values to decode(items)."""
    wrong = 0
    for _ in range(rounds):
        # the size of a decoded image, so that a freed block fits the decoder's next output
        blocks = [torch.full((3, 375, 500), 1, dtype=torch.uint8, device=CUDA) for _ in items]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # tens of ms of work queued on the training stream
        sums = [b.sum(dtype=torch.int64) for b in blocks]
        del blocks  # freed while the reductions that read them still wait behind the sleep
        decode(items, CUDA)
        torch.cuda.synchronize()
        wrong += sum(int(s) != 3 * 375 * 500 for s in sums)
    return wrong


@NATIVE_ALLOCATOR
def test_gpu_decode_leaves_memory_the_training_stream_still_reads(tmp_path) -> None:
    """torchvision's nvJPEG writes its outputs from a stream of its own that does not wait for
    the caller's (pytorch/vision#9606). DeviceDecode decodes on a stream of its own, so blocks
    the training stream freed with reads still queued keep their values. The same rounds with
    the decode on the training stream (DeviceDecode.decode called directly, as before the fix)
    must show the hazard, or this GPU cannot tell the two apart and the test skips."""
    from PIL import Image
    from skimage import data as skdata

    Image.fromarray(skdata.chelsea()).resize((500, 375)).save(tmp_path / "a.jpg", quality=90)
    geo = JigsawGeometry.for_image_size(96)
    enc = A.EncodedTransform(geo, reduce=False)
    decode = A.DeviceDecode(A.CropTransform(geo, reduce=False))
    items = [enc(tmp_path / "a.jpg") for _ in range(16)]
    decode(items, CUDA)  # the decoder's set-up, outside the rounds
    assert decode.refused == 0
    ours = overwritten_rounds(decode, items)
    same_stream = overwritten_rounds(decode.decode, items)
    assert ours == 0, f"{ours} reads overwritten on our stream, {same_stream} on the training one"
    if same_stream == 0:
        pytest.skip("decoding on the training stream overwrote nothing on this GPU either")


def crops_overwritten(decode, items: list, rounds: int = 10) -> int:
    """Rounds in which crops that decode returned, freed while the training stream still had
    a read of them queued (behind a long sleep), were overwritten by the next decode."""
    wrong = 0
    for _ in range(rounds):
        images, sources = decode(items[:16], CUDA)
        want = int(images.sum(dtype=torch.int64))
        torch.cuda._sleep(100_000_000)
        got = images.sum(dtype=torch.int64)
        del images, sources  # freed while the training stream's read still waits
        decode(items, CUDA)
        torch.cuda.synchronize()
        wrong += int(got) != want
    return wrong


@NATIVE_ALLOCATOR
def test_gpu_decode_keeps_its_crops_until_the_training_stream_is_done(tmp_path, monkeypatch):
    """The crops are allocated on DeviceDecode's side stream and read on the training stream:
    record_stream must keep their block from the next decode while the training stream still
    has reads of it queued. 16 crops of 96 px take 16 * 3 * 96 * 96 bytes, the size of one
    decoded 384x384 JPEG, so the block fits the next decode's outputs. The same rounds with
    record_stream disabled must show the hazard, or this allocator never hands that block to
    the decoder and the test skips."""
    from PIL import Image
    from skimage import data as skdata

    Image.fromarray(skdata.chelsea()).resize((384, 384)).save(tmp_path / "a.jpg", quality=90)
    geo = JigsawGeometry.for_image_size(96)
    enc = A.EncodedTransform(geo, reduce=False)
    decode = A.DeviceDecode(A.CropTransform(geo, reduce=False))
    items = [enc(tmp_path / "a.jpg") for _ in range(17)]
    decode(items, CUDA)
    ours = crops_overwritten(decode, items)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda *args: None)
    unrecorded = crops_overwritten(decode, items)
    assert ours == 0, f"{ours} crops overwritten; {unrecorded} without record_stream"
    if unrecorded == 0:
        pytest.skip("without record_stream nothing was overwritten either on this GPU")
