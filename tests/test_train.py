"""Training loop: learning, exact resume, NaN stop, bad inputs, and DDP memory replicas."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pirl.pretrain as train
from pirl.data import list_images
from pirl.errors import UserError
from pirl.pretrain import PretrainConfig, pretrain
from pirl.safe_load import read_checkpoint

TINY = dict(arch="resnet18", width=0.125, image_size=32, batch_size=16, num_negatives=64)


def tiny_config(data: Path, out: Path, **kw: object) -> PretrainConfig:
    base = dict(data=str(data), out=str(out), epochs=2, num_workers=0, seed=0, device="cpu", **TINY)
    base.update(kw)
    return PretrainConfig(**base)


def test_loss_decreases_on_a_tiny_set(tiny_folder: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_folder, tmp_path / "run", epochs=6, lr=0.1, loss="infonce")
    pretrain(cfg)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.2, losses


class Interrupt(Exception):
    pass


def test_resume_gives_identical_weights(tiny_folder: Path, tmp_path: Path, monkeypatch) -> None:
    full = pretrain(tiny_config(tiny_folder, tmp_path / "full", epochs=2))
    # Same run, killed in the middle of epoch 2, then resumed from its epoch-1 checkpoint.
    real_step = torch.optim.SGD.step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # 3 steps per epoch: this is the first step of epoch 2
            raise Interrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", dying_step)
    with pytest.raises(Interrupt):
        pretrain(tiny_config(tiny_folder, tmp_path / "cut", epochs=2))
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pth")["epoch"] == 1
    resumed = pretrain(tiny_config(tiny_folder, tmp_path / "cut", epochs=2, resume=True))
    a, b = full.state(), resumed.state()
    for part in ("trunk", "heads"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    assert torch.equal(a["memory"]["bank"], b["memory"]["bank"])
    assert b["step"] == a["step"] == 6


def test_nan_loss_stops_and_keeps_last_checkpoint(
    tiny_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    pretrain(tiny_config(tiny_folder, out, epochs=1))
    saved = (out / "checkpoint.pth").read_bytes()
    monkeypatch.setattr(train.PirlLoss, "mix", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(UserError, match=r"loss became nan at epoch 2.*last good checkpoint"):
        pretrain(tiny_config(tiny_folder, out, epochs=2, resume=True, allow_change=("epochs",)))
    assert (out / "checkpoint.pth").read_bytes() == saved


def test_missing_and_empty_folders_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        pretrain(tiny_config(tmp_path / "nope", tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        pretrain(tiny_config(tmp_path / "empty", tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_corrupt_image_stops_or_is_skipped(tiny_folder: Path, tmp_path: Path) -> None:
    bad = tiny_folder / "digit0" / "broken.png"
    good = next((tiny_folder / "digit1").glob("*.png")).read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated PNG
    with pytest.raises(UserError, match=r"broken\.png: unreadable image"):
        pretrain(tiny_config(tiny_folder, tmp_path / "strict", epochs=1))
    pretrain(tiny_config(tiny_folder, tmp_path / "skip", epochs=1, skip_bad_images=True))
    with open(tmp_path / "skip" / "metrics.csv", newline="") as fh:
        assert [r["skipped_images"] for r in csv.DictReader(fh)] == ["1"]


def test_truncated_checkpoint_is_a_clear_error(tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    pretrain(tiny_config(tiny_folder, out, epochs=1))
    ckpt = out / "checkpoint.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"checkpoint\.pth: unreadable, truncated"):
        pretrain(tiny_config(tiny_folder, out, epochs=2, resume=True, allow_change=("epochs",)))


def test_existing_run_needs_resume(tiny_folder: Path, tmp_path: Path) -> None:
    pretrain(tiny_config(tiny_folder, tmp_path / "run", epochs=1))
    with pytest.raises(UserError, match="pass --resume"):
        pretrain(tiny_config(tiny_folder, tmp_path / "run", epochs=1))


def _ddp_worker(rank: int, world: int, port: int, cfg: PretrainConfig, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    draws = []
    sample = train.MemoryBank.sample

    def recording(self, shape, generator=None):
        draws.append(sample(self, shape, generator))
        return draws[-1]

    train.MemoryBank.sample = recording  # this spawned process only
    trainer = pretrain(cfg)
    torch.save(trainer.memory.bank, Path(out) / f"bank{rank}.pt")
    torch.save(draws, Path(out) / f"draws{rank}.pt")
    dist.destroy_process_group()


def test_ddp_memory_bank_replicas_stay_identical(tiny_folder: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_folder, tmp_path / "run", epochs=1)
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, train.free_port(), cfg, str(tmp_path)), nprocs=2
    )
    b0, b1 = torch.load(tmp_path / "bank0.pt"), torch.load(tmp_path / "bank1.pt")
    assert torch.equal(b0, b1)
    initial = train.MemoryBank(48, 128, seed=0).bank
    changed = (b0 != initial).any(dim=1)
    assert changed.sum() == 48  # each rank updated its half and received the other half
    # Each rank draws its own negatives (VISSL seeds every rank apart), every step and term.
    d0, d1 = torch.load(tmp_path / "draws0.pt"), torch.load(tmp_path / "draws1.pt")
    assert len(d0) == len(d1) == 2 * 3
    assert all(not torch.equal(a, b) for a, b in zip(d0, d1, strict=True))
    assert dataclasses.asdict(cfg)["batch_size"] == 16


def test_pil_augment_path_still_trains_and_unknown_path_is_rejected(
    tiny_folder: Path, tmp_path: Path
) -> None:
    trainer = pretrain(tiny_config(tiny_folder, tmp_path / "pil", epochs=1, augment="pil"))
    assert (
        trainer.step == 3
        and read_checkpoint(tmp_path / "pil" / "checkpoint.pth")["config"]["augment"] == "pil"
    )
    with pytest.raises(UserError, match="--augment gpu: choose from"):
        pretrain(tiny_config(tiny_folder, tmp_path / "bad", augment="gpu"))


def test_half_bank_and_shared_negatives_train_and_checkpoint(
    tiny_folder: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        tiny_folder, tmp_path / "run", epochs=1, bank_dtype="bfloat16", shared_negatives=True
    )
    trainer = pretrain(cfg)
    bank = read_checkpoint(tmp_path / "run" / "checkpoint.pth")["memory"]["bank"]
    assert bank.dtype == torch.bfloat16 and torch.equal(bank, trainer.memory.bank)
    assert trainer.criterion.shared_negatives
    torch.testing.assert_close(bank.float().norm(dim=1), torch.ones(48), rtol=0, atol=1e-2)
    with pytest.raises(UserError, match="--bank-dtype float8: choose from"):
        pretrain(tiny_config(tiny_folder, tmp_path / "bad", bank_dtype="float8"))


def test_embedded_checkpoint_is_trained_once_and_shared(tiny_folder: Path, monkeypatch) -> None:
    small = dict(data=str(tiny_folder), epochs=1, **TINY)
    first = train.embedded_checkpoint("pirl", "cpu", 0, **small)
    assert read_checkpoint(first)["epoch"] == 1
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: pytest.fail("trained again"))
    assert train.embedded_checkpoint("pirl", "cpu", 0, **small) == first


def test_patches_pass_the_trunk_before_the_image(tiny_folder: Path, tmp_path: Path) -> None:
    """VISSL's INPUT_KEY_NAMES order: BN's running statistics end on the image batch."""
    trainer = train.make_trainer(
        train.PretrainConfig(data=str(tiny_folder), **TINY).resolved(), 48, torch.device("cpu")
    )
    batches = []
    trainer.model.trunk.conv1.register_forward_pre_hook(lambda m, a: batches.append(len(a[0])))
    images, patches = torch.randn(4, 3, 32, 32), torch.randn(4, 9, 3, 12, 12)
    trainer.model(images, patches)
    assert batches == [36, 4]


def test_cosine_lr_is_updated_once_per_epoch(
    tiny_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """VISSL's PIRL schedule: lr(e) = final + (base - final)(1 + cos(pi e / E)) / 2 for every
    step of epoch e; --lr-interval step moves it at every step."""
    seen: list[float] = []
    real_step = torch.optim.SGD.step

    def recording(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    pretrain(tiny_config(tiny_folder, tmp_path / "epoch", epochs=2, lr=0.1, loss="infonce"))
    final = 0.1 * 1e-3
    assert seen == pytest.approx([0.1] * 3 + [final + (0.1 - final) * 0.5] * 3, rel=1e-12)
    seen.clear()
    cfg = tiny_config(tiny_folder, tmp_path / "step", epochs=2, lr=0.1, lr_interval="step")
    pretrain(dataclasses.replace(cfg, loss="infonce"))
    assert len(set(seen)) == 6 and seen[0] == 0.1
    with pytest.raises(UserError, match="--lr-interval month: choose from"):
        pretrain(tiny_config(tiny_folder, tmp_path / "bad", lr_interval="month"))


def test_npid_decays_linear_biases_as_vissl_and_pirl_does_not(tiny_folder: Path) -> None:
    """VISSL: regularize_bias True for NPID++, False for PIRL; BN never decayed."""

    def decayed(method: str) -> set[str]:
        cfg = train.PretrainConfig(data=str(tiny_folder), method=method, **TINY).resolved()
        trainer = train.make_trainer(cfg, 48, torch.device("cpu"))
        ids = {
            id(p)
            for g in trainer.optimizer.param_groups
            if g["weight_decay"] > 0
            for p in g["params"]
        }
        return {n for n, p in trainer.model.named_parameters() if id(p) in ids}

    npid, pirl = decayed("npid"), decayed("pirl")
    assert npid - pirl == {"heads.f.proj.bias", "heads.g.proj.bias", "heads.g.combine.bias"}
    assert all(n.endswith("weight") for n in pirl) and pirl < npid


def split_folder(root: Path, tiny_folder: Path) -> Path:
    """tiny_folder's 48 images as root/train (36) and root/val (12), class folders kept."""
    for i, p in enumerate(sorted(tiny_folder.rglob("*.png"))):
        dest = root / ("val" if i % 4 == 0 else "train") / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    return root


def knn_by_hand(trunk: torch.nn.Module, root: Path, size: int) -> float:
    """Weighted kNN top-1 (k=20, votes exp(s/0.07)) with scikit-learn's brute-force cosine
    neighbours on res5 global averages of Resize + CenterCrop inputs."""
    from sklearn.neighbors import NearestNeighbors

    from pirl.data import list_images, load_image
    from pirl.features import center_crop_transform

    tf = center_crop_transform(size)
    trunk = trunk.eval()

    def feats(split: str) -> tuple[np.ndarray, np.ndarray]:
        items = list_images(root / split)
        x = torch.stack([tf(load_image(p)) for p in items.paths])
        with torch.no_grad():
            return trunk.pooled(x).double().numpy(), np.array(items.labels)

    (xtr, ytr), (xte, yte) = feats("train"), feats("val")
    dist, idx = NearestNeighbors(n_neighbors=20, metric="cosine").fit(xtr).kneighbors(xte)
    votes = np.zeros((len(xte), ytr.max() + 1))
    np.add.at(votes, (np.arange(len(xte))[:, None], ytr[idx]), np.exp((1 - dist) / 0.07))
    return 100 * float((votes.argmax(1) == yte).mean())


def test_knn_monitor_logs_each_due_epoch_and_compares_with_the_untrained_trunk(
    tiny_folder: Path, tmp_path: Path
) -> None:
    val = split_folder(tmp_path / "split", tiny_folder)
    cfg = tiny_config(tiny_folder, tmp_path / "run", epochs=3, eval_every=2, val_data=str(val))
    trainer = pretrain(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open(newline="")))
    for key in ("knn_top1", "fg_retrieval", "fg_ratio"):  # epochs 2 (due) and 3 (the last)
        assert [bool(r[key]) for r in rows] == [False, True, True]
    for r in rows:  # each term on its own, mixed by lambda = 0.5 into the loss
        total = 0.5 * float(r["patch_loss"]) + 0.5 * float(r["image_loss"])
        assert float(r["loss"]) == pytest.approx(total, rel=1e-5)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["final_patch_loss"] == pytest.approx(float(rows[-1]["patch_loss"]))
    assert results["fg_retrieval_chance"] == pytest.approx(100 / len(list_images(val / "val")))
    for key in ("fg_retrieval", "random_fg_retrieval"):
        assert 0 <= results[key] <= 100
    assert 0 < results["fg_ratio"] < 2 and 0 < results["random_fg_ratio"] < 2
    assert results["knn_top1"] == pytest.approx(knn_by_hand(trainer.model.trunk, val, 32))
    torch.manual_seed(0)
    untrained = train.build_trunk("resnet18", 0.125)
    assert results["random_knn_top1"] == pytest.approx(knn_by_hand(untrained, val, 32))
    total = 65 + float(np.finfo("float32").eps) * 48  # 1 + N + eps |D|, VISSL's eps
    assert results["chance_loss"] == pytest.approx(math.log(total) + 64 * math.log(total / 64))
    assert (tmp_path / "run" / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="--eval-every 1: the kNN monitor needs --val-data"):
        pretrain(tiny_config(tiny_folder, tmp_path / "bad", eval_every=1))


def retrieval_after_training(shuffle_pairs: bool, steps: int = 100) -> tuple[float, float]:
    """Train PIRL on 32 embedded images with mild augmentation (the jigsaw cut and flips, no
    colour ops); return how often f(image) and g(its jigsaw view) find the image's own bank row.
    shuffle_pairs gives each step's patches to other images of the batch: nothing to learn."""

    from pirl.augment import BatchAugment, PhotometricSpec
    from pirl.data import embedded_images
    from pirl.jigsaw import JigsawGeometry

    images, _ = embedded_images(size=32, seed=0)
    sources = torch.nn.functional.interpolate(
        torch.tensor(np.stack(images[:32])).permute(0, 3, 1, 2).float(), size=36, mode="bilinear"
    )
    sources = sources.round().clamp(0, 255).to(torch.uint8)
    views = sources[:, :, 2:34, 2:34].contiguous()
    mild = PhotometricSpec(0, 0, 0, 0, photometric=0, grayscale=0)
    augment = BatchAugment(JigsawGeometry.for_image_size(32), mild)
    cfg = train.PretrainConfig(  # unit starting rows, as the embedded recipe's
        data="unused", **{**TINY, "num_negatives": 31}, loss="infonce", lr=0.06, bank_init_ranks=1
    ).resolved()
    trainer = train.make_trainer(cfg, 32, torch.device("cpu"))
    trainer.augment = None  # the views below come augmented
    gen, neg_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(32, generator=gen)[:16]
        x, patches, _ = augment(views[idx], sources[idx], gen)
        if shuffle_pairs:
            patches = patches[torch.randperm(16, generator=gen)]
        loss, f, _ = trainer.loss(trainer.model, (x, patches), idx, neg_gen, gen, amp=False)
        trainer.update(loss, cfg.lr, idx, f)
    idx = torch.arange(32)
    x, patches, _ = augment(views, sources, gen)
    with torch.no_grad():  # batch statistics, as in training: the running ones mix the patch
        f, g = trainer.model(x, patches)  # and image batches, far apart at 32 px
    bank = trainer.memory.bank
    return tuple(float(((z @ bank.T).argmax(1) == idx).float().mean()) for z in (f, g))


def test_f_and_g_retrieve_their_images_memory_rows() -> None:
    """The paper's mechanism end to end: after a short run both heads find the image's own
    memory row far above chance (1/32)."""
    f_hits, g_hits = retrieval_after_training(shuffle_pairs=False)
    assert f_hits >= 0.5 and g_hits >= 0.2, (f_hits, g_hits)  # chance 0.03


def test_retrieval_check_fails_when_patches_are_paired_with_other_images() -> None:
    """The same run with each step's patches handed to other images: g cannot learn the
    pairing, so the check above would fail."""
    f_hits, g_hits = retrieval_after_training(shuffle_pairs=True)
    assert g_hits < 0.1, g_hits


def test_embedded_recipe_softens_the_augmentation_and_the_paper_keeps_vissls(
    tiny_folder: Path,
) -> None:
    """--data: VISSL's crops (8-100%), hue 0.2 and photometric ops p 0.66; embedded: 50-100%,
    no hue, no photometric ops, carried into both augmentation paths."""
    from pirl.data import list_images

    paper = train.PretrainConfig(data=str(tiny_folder)).resolved()
    assert (paper.crop_scale, paper.hue, paper.photometric) == (0.08, 0.2, 0.66)
    small = dataclasses.replace(
        train.PretrainConfig(**TINY).resolved(), data=str(tiny_folder), num_workers=0
    )
    assert (small.crop_scale, small.hue, small.photometric) == (0.5, 0.0, 0.0)
    n = len(list_images(tiny_folder))
    batched = train.make_trainer(small, n, torch.device("cpu")).transform()
    assert batched.image_crop.scale == (0.5, 1.0)
    pil = dataclasses.replace(small, augment="pil")
    ops = train.make_trainer(pil, n, torch.device("cpu")).transform().augment.transforms
    assert ops[0].hue is None and ops[1].p == 0.0  # torchvision: hue 0 is no hue jitter


def test_resume_with_changed_settings_names_each_and_allow_change_lets_one_through(
    tiny_folder: Path, tmp_path: Path
) -> None:
    """The record must describe every epoch trained: a resume may change only what it names."""
    out = tmp_path / "run"
    pretrain(tiny_config(tiny_folder, out, epochs=1))
    changed = tiny_config(tiny_folder, out, epochs=2, resume=True, seed=5, batch_size=8, lr=0.5)
    with pytest.raises(UserError, match=r"changed settings \(batch_size 16 -> 8, epochs 1 -> 2, "):
        pretrain(changed)
    assert json.loads((out / "config.json").read_text())["seed"] == 0  # record untouched
    with pytest.raises(UserError, match=r"\(lr 0\.001875 -> 0\.5, seed 0 -> 5\)"):
        pretrain(dataclasses.replace(changed, allow_change=("epochs", "batch_size")))
    trainer = pretrain(
        tiny_config(tiny_folder, out, epochs=2, resume=True, allow_change=("epochs",), decode="cpu")
    )
    assert trainer.epoch == 2
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "pretrain" and len(record["invocations"]) == 2
    assert record["invocations"][0]["versions"]["torch"] == torch.__version__
    # where each invocation decoded, --decode auto resolved; --decode may change on a resume
    assert [r["decode"] for r in record["invocations"]] == ["workers: libjpeg-turbo"] * 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"epochs": 0}, "--epochs 0: must be at least 1"),
        ({"epochs": -3}, "--epochs -3: must be at least 1"),
        ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
        ({"device": "cuda:7" if torch.cuda.is_available() else "cuda"}, "CUDA device"),
        ({"device": "tpu"}, "--device tpu: unknown"),
    ],
)
def test_run_level_mistakes_stop_before_any_work(
    tiny_folder: Path, tmp_path: Path, setting: dict, message: str
) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        pretrain(tiny_config(tiny_folder, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()


def test_save_every_keeps_snapshots_and_the_end_exports_a_torchvision_trunk(
    tiny_folder: Path, tmp_path: Path
) -> None:
    import torchvision
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from pirl.weights import load_encoder
    from pirl_tools.main import main

    out = tmp_path / "run"
    args = (
        f"pretrain --data {tiny_folder} --out {out} --arch resnet18 --width 1 --image-size 32 "
        "--epochs 3 --batch-size 16 --num-negatives 64 --device cpu --num-workers 0 "
        "--save-every 2"
    ).split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{out / 'trunk.pth'}, {out / 'trunk.safetensors'}" in result.output
    assert sorted(p.name for p in out.glob("checkpoint*.pth")) == [
        "checkpoint.pth",
        "checkpoint_epoch2.pth",
    ]
    last, snap = (
        read_checkpoint(out / "checkpoint.pth"),
        read_checkpoint(out / "checkpoint_epoch2.pth"),
    )
    assert (last["epoch"], snap["epoch"]) == (3, 2)
    assert not all(torch.equal(last["trunk"][k], snap["trunk"][k]) for k in snap["trunk"])
    exported = {
        "trunk.pth": read_checkpoint(out / "trunk.pth"),
        "trunk.safetensors": load_file(str(out / "trunk.safetensors")),
        "checkpoint_epoch2.pth": snap["trunk"],
    }
    reference = torchvision.models.resnet18()
    del reference.fc
    for name, state in exported.items():
        reference.load_state_dict(state, strict=True)  # raises on a missing or unexpected key
        enc = load_encoder(out / name)
        assert (enc.arch, enc.width) == ("resnet18", 1.0)
        for key, value in enc.trunk.state_dict().items():
            assert torch.equal(value, state[key]), f"{name}: {key}"
    for key, value in last["trunk"].items():
        assert torch.equal(exported["trunk.pth"][key], value)
        assert torch.equal(exported["trunk.safetensors"][key], value)


def test_ddp_pretraining_with_the_knn_monitor_scores_on_rank_0_alone(
    tiny_folder: Path, tmp_path: Path
) -> None:
    """The monitor runs on rank 0 only: its extraction must not wait for the other ranks."""
    val = split_folder(tmp_path / "val", tiny_folder)
    cfg = tiny_config(tiny_folder, tmp_path / "run", epochs=2, eval_every=1, val_data=str(val))
    train.pretrain_multiprocess(cfg, 2)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open(newline="")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["knn_top1"] for r in rows)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["knn_top1"] <= 100 and 0 <= results["random_knn_top1"] <= 100


@pytest.mark.parametrize("patch_bn_stats", [False, True])
def test_running_statistics_are_the_image_pass_unless_asked_to_blend(patch_bn_stats: bool) -> None:
    """bn1's running mean after one forward, by hand: momentum 0.1 from zero, the patch batch
    first (VISSL's order) and then the image batch; by default only the image batch counts."""
    from pirl.heads import PirlHeads

    torch.manual_seed(0)
    trunk = train.build_trunk("resnet18", 0.125)
    model = train.PirlModel(trunk, PirlHeads(trunk.out_dim, 16), patch_bn_stats).train()
    images, patches = torch.randn(4, 3, 32, 32) + 1, torch.randn(4, 9, 3, 9, 9) - 1
    with torch.no_grad():
        image_mean = trunk.conv1(images).mean((0, 2, 3))
        patch_mean = trunk.conv1(patches.flatten(0, 1)).mean((0, 2, 3))
        model(images, patches)
    expected = 0.1 * image_mean + (0.9 * 0.1 * patch_mean if patch_bn_stats else 0)
    torch.testing.assert_close(trunk.bn1.running_mean, expected)
    assert trunk.bn1.momentum == 0.1  # restored after the patch pass


def test_npid_trains_on_vissls_npid_augmentation_with_data(tiny_folder: Path) -> None:
    """VISSL's NPID++ config: ColorJitter(0.4, 0.4, 0.4, hue 0.4) before the crop, a flip, no
    grayscale and no photometric ops, per image; --npid-augment pirl keeps PIRL's image view."""
    from PIL import Image

    from pirl.jigsaw import NpidTransform

    cfg = PretrainConfig(data=str(tiny_folder), method="npid").resolved()
    assert cfg.npid_augment == "vissl" and cfg.hue is None and cfg.photometric is None
    trainer = train.make_trainer(cfg, 10, torch.device("cpu"))
    transform = trainer.transform()
    assert isinstance(transform, NpidTransform) and trainer.augment is None
    assert train.decoding(cfg) == "workers: PIL"
    flat = Image.new("RGB", (40, 40), (200, 40, 90))
    torch.manual_seed(0)
    views = torch.stack([transform(flat)[0] for _ in range(200)])
    rgb = views.mean(dim=(2, 3))
    assert ((rgb.amax(1) - rgb.amin(1)) > 1e-3).all()  # never grayscale (PIRL's: 20%)
    hue_moved = (rgb.argmax(1) != rgb[0].argmax()).float().mean()  # hue 0.4 turns red away
    assert hue_moved > 0.2
    pirl_view = PretrainConfig(data=str(tiny_folder), method="npid", npid_augment="pirl")
    assert type(train.make_trainer(pirl_view.resolved(), 10, torch.device("cpu")).transform()) is (
        train.CropTransform
    )
    assert PretrainConfig(method="npid").resolved().npid_augment == "pirl"  # embedded
    with pytest.raises(UserError, match="--hue 0.1: NPID..? trains on VISSL's NPID"):
        PretrainConfig(data=str(tiny_folder), method="npid", hue=0.1).resolved()
    with pytest.raises(UserError, match="--npid-augment vissl: only for --method npid"):
        PretrainConfig(data=str(tiny_folder), npid_augment="vissl").resolved()
