"""Low-shot fine-tuning: subsets, split files, top-k, the training loop, resume, CLI, Table 3."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import top_k_accuracy_score

from pirl.data import list_images
from pirl.errors import UserError
from pirl.tables import markdown_table
from pirl.trunk import build_trunk
from pirl.weights import load_encoder
from pirl_tools.transfer import lowshot
from transfer.lowshot import (
    FineTuneNet,
    LowshotConfig,
    balanced_subset,
    finetune,
    lr_factor,
    predict,
    read_split_file,
    topk_accuracy,
    write_subset,
)
from transfer.table3 import read_runs, table3

SIZES = {0: 37, 1: 25, 2: 6, 3: 14}  # uneven on purpose: 25 at 10% is the half-up case
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture
def uneven(tmp_path, digit_images):
    """An ImageFolder train/ of real digit images with SIZES images per class."""
    images, labels = digit_images
    root = tmp_path / "uneven" / "train"
    for c, n in SIZES.items():
        (root / f"digit{c}").mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:n]:
            Image.fromarray(images[i]).save(root / f"digit{c}" / f"{i:04d}.png")
    return list_images(root)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four classes of 32-px crops of scikit-image's photos, ImageFolder train/ and val/."""
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        photo = getattr(skdata, name)()
        h, w = photo.shape[:2]
        for i in range(60):
            s = int(rng.integers(min(h, w) // 6, min(h, w) // 2))
            y, x = rng.integers(0, h - s), rng.integers(0, w - s)
            crop = Image.fromarray(photo[y : y + s, x : x + s]).resize((32, 32), Image.BILINEAR)
            d = root / ("val" if i % 4 == 0 else "train") / name
            d.mkdir(parents=True, exist_ok=True)
            crop.save(d / f"{name}_{i:03d}.png")
    return root


def _cfg(data: Path, out: Path, **kw) -> LowshotConfig:
    base = dict(
        data=str(data),
        out=str(out),
        image_size=32,
        batch_size=16,
        num_workers=0,
        device="cpu",
        weights="random:resnet18@0.125",
        name="random",
    )
    return LowshotConfig(**{**base, **kw})


# --------------------------------------------------------------------------- subsets


def test_subset_counts_are_rounded_percent_of_each_class(uneven):
    for percent in (1, 10, 50):
        sub = balanced_subset(uneven, percent, seed=0)
        for c, n in SIZES.items():
            expect = max(1, (2 * percent * n + 100) // 200)  # round half up, in integers
            assert sub.counts[f"digit{c}"] == expect
        chosen_labels = [uneven.labels[i] for i in sub.indices]
        assert np.bincount(chosen_labels).tolist() == list(sub.counts.values())
        assert len(set(sub.indices)) == len(sub.indices)
        assert sub.short == {}
    assert balanced_subset(uneven, 10, seed=0).counts["digit1"] == 3  # 2.5 rounds up


def test_subset_is_seeded_and_nested(uneven):
    a, b = balanced_subset(uneven, 50, seed=0), balanced_subset(uneven, 50, seed=0)
    c = balanced_subset(uneven, 50, seed=1)
    assert a.indices == b.indices
    assert a.indices != c.indices
    assert a.counts == c.counts
    assert set(balanced_subset(uneven, 10, seed=0).indices) <= set(a.indices)


def test_class_with_too_few_images_is_reported(uneven, caplog):
    with caplog.at_level(logging.WARNING):
        sub = balanced_subset(uneven, 10, seed=0, per_class=10)
    assert sub.short == {"digit2": {"asked": 10, "available": 6}}
    assert sub.counts == {"digit0": 10, "digit1": 10, "digit2": 6, "digit3": 10}
    assert "digit2 has 6 images" in caplog.text
    with pytest.raises(UserError, match="--percent 0"):
        balanced_subset(uneven, 0, seed=0)


# --------------------------------------------------------------------------- split files


def test_split_file_forms_and_round_trip(uneven, tmp_path):
    names = {p.name: p for p in uneven.paths}
    first0 = sorted(p.name for p in uneven.paths if p.parent.name == "digit0")[0]
    first3 = sorted(p.name for p in uneven.paths if p.parent.name == "digit3")[0]
    split = tmp_path / "split.txt"
    split.write_text(f"# chosen by hand\ndigit0/{first0}\n\ntrain/digit3/{first3}\n")
    sub = read_split_file(split, uneven)
    assert [uneven.paths[i] for i in sub.indices] == [names[first0], names[first3]]
    assert sub.counts == {"digit0": 1, "digit1": 0, "digit2": 0, "digit3": 1}
    assert set(sub.short) == {"digit1", "digit2"}
    drawn = balanced_subset(uneven, 50, seed=3)
    back = read_split_file(write_subset(tmp_path / "subset.txt", drawn, uneven), uneven)
    assert back.indices == drawn.indices and back.counts == drawn.counts


def test_split_file_imagenet_names(tmp_path, digit_images):
    images, _ = digit_images
    train = tmp_path / "imagenet" / "train"
    files = [
        "n01440764/n01440764_10026.JPEG",
        "n01440764/n01440764_7.JPEG",
        "n01443537/n01443537_2.JPEG",
    ]
    for i, f in enumerate(files):
        (train / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(train / f, format="JPEG")
    listing = list_images(train)
    split = tmp_path / "1percent.txt"
    split.write_text("n01440764_10026.JPEG\nn01443537_2.JPEG\n")
    sub = read_split_file(split, listing)
    assert [listing.paths[i].name for i in sub.indices] == [
        "n01440764_10026.JPEG",
        "n01443537_2.JPEG",
    ]


@pytest.mark.parametrize(
    "lines, lineno, what",
    [
        (["digit0/{a}", "digit0/{a} extra"], 2, "expected one image path"),
        (["digit0/{a}", "", "digit9/{a}"], 3, "class 'digit9' is not a folder"),
        (["digit1/missing.png"], 1, "missing.png is not in"),
        (["digit0/{a}", "digit0/{a}"], 2, "repeats line 1"),
        (["{a}"], 1, "names no class"),
    ],
)
def test_split_file_errors_name_file_and_line(uneven, tmp_path, lines, lineno, what):
    a = sorted(p.name for p in uneven.paths if p.parent.name == "digit0")[0]
    split = tmp_path / "bad.txt"
    split.write_text("".join(line.format(a=a) + "\n" for line in lines))
    with pytest.raises(UserError, match=re.escape(f"{split}:{lineno}: ") + ".*" + what):
        read_split_file(split, uneven)


def test_split_file_missing_or_empty(uneven, tmp_path):
    with pytest.raises(UserError, match="split file not found"):
        read_split_file(tmp_path / "nope.txt", uneven)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UserError, match="empty.txt: no images listed"):
        read_split_file(tmp_path / "empty.txt", uneven)


# --------------------------------------------------------------------------- metrics, schedule


def test_topk_matches_sklearn():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 7, generator=gen)
    labels = torch.randint(0, 7, (60,), generator=gen)
    ours = topk_accuracy(logits, labels, (1, 3, 5))
    for k in (1, 3, 5):
        ref = top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k, labels=list(range(7)))
        assert ours[k] == pytest.approx(ref)


def test_paper_schedule_scales_with_epochs(tmp_path):
    assert LowshotConfig(data=str(tmp_path), epochs=70).resolved().milestones == [30]
    assert LowshotConfig(data=str(tmp_path), epochs=7).resolved().milestones == [3]
    assert LowshotConfig(data=str(tmp_path)).resolved().epochs == 70
    assert [lr_factor(e, [3]) for e in (0, 2, 3, 6)] == [1, 1, pytest.approx(0.1)] + [
        pytest.approx(0.1)
    ]


def test_lr_scales_with_the_batch_as_vissls_auto_scale(tmp_path):
    """VISSL's semi-supervised config: base 0.01 per 256 images, auto_scale on; the embedded
    recipe keeps 0.01 at its batch of 64; an explicit --lr is kept."""
    for batch, lr in ((256, 0.01), (512, 0.02), (32, 0.00125)):
        cfg = LowshotConfig(data=str(tmp_path), batch_size=batch).resolved()
        assert cfg.lr == pytest.approx(lr) and cfg.head_lr == pytest.approx(lr)
    assert LowshotConfig().resolved().lr == 0.01
    assert LowshotConfig(data=str(tmp_path), batch_size=512, lr=0.3).resolved().lr == 0.3


def test_classifier_keeps_pytorchs_default_init():
    """VISSL's mlp head keeps nn.Linear's initialisation: weights and bias uniform within
    1 / sqrt(fan_in) (kaiming_uniform with a = sqrt(5)), the bias not zero."""
    torch.manual_seed(0)
    net = FineTuneNet(build_trunk("resnet18", 0.125), 10)
    bound = 1 / math.sqrt(net.fc.in_features)
    for p in (net.fc.weight, net.fc.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
    # uniform on [-b, b] has standard deviation b / sqrt(3)
    assert net.fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory):
    """A random trunk fine-tuned on all training images (the 'trained' encoder of later tests)."""
    out = tmp_path_factory.mktemp("stage1")
    cfg = _cfg(photos, out, percent=100, epochs=8, lr=0.1, min_crop=0.5)
    return out, finetune(cfg)


def test_finetuning_learns_beyond_the_untrained_model(photos, trained):
    out, results = trained
    val = list_images(photos / "val")
    torch.manual_seed(0)  # the seed finetune draws the head from
    before = FineTuneNet(load_encoder("random:resnet18@0.125", seed=0).trunk, len(PHOTOS))
    logits, labels = predict(before, val, 32, 64, torch.device("cpu"))
    untrained = 100 * topk_accuracy(logits, labels, (1,))[1]
    assert results["top1"] >= 70
    assert results["top1"] >= untrained + 30
    assert results["top5"] == 100  # four classes: every label is in the top 5
    assert results["train_images"] == len(list_images(photos / "train"))
    assert results["per_class"] == dict.fromkeys(PHOTOS, 45)


def test_checkpoint_loads_as_encoder_and_reproduces_top1(photos, trained):
    out, results = trained
    enc = load_encoder(out / "checkpoint.pth")
    assert (enc.format, enc.arch, enc.width) == ("native", "resnet18", 0.125)
    model = FineTuneNet(enc.trunk, len(PHOTOS))
    model.fc.load_state_dict(torch.load(out / "checkpoint.pth", weights_only=True)["classifier"])
    logits, labels = predict(model, list_images(photos / "val"), 32, 64, torch.device("cpu"))
    assert 100 * topk_accuracy(logits, labels, (1,))[1] == pytest.approx(results["top1"])


def test_trained_encoder_beats_random_init_at_low_shot(photos, trained, tmp_path):
    out, _ = trained
    kw = dict(percent=10, epochs=10, batch_size=8, lr=0.01, head_lr=0.5, min_crop=0.5)
    ckpt = str(out / "checkpoint.pth")
    pre = finetune(_cfg(photos, tmp_path / "pre", weights=ckpt, name="trained", **kw))
    rnd = finetune(_cfg(photos, tmp_path / "rnd", **kw))
    assert pre["train_images"] == rnd["train_images"] == 5 * len(PHOTOS)  # 10% of 45, rounded
    assert pre["top1"] >= 70
    assert pre["top1"] >= rnd["top1"] + 20


def test_resume_continues_exactly(photos, tmp_path):
    kw = dict(percent=10, batch_size=8, lr=0.05, head_lr=0.2)
    straight = finetune(_cfg(photos, tmp_path / "a", epochs=2, **kw))
    finetune(_cfg(photos, tmp_path / "b", epochs=1, **kw))
    with pytest.raises(UserError, match="a transfer lowshot run exists here"):
        finetune(_cfg(photos, tmp_path / "b", epochs=2, **kw))
    with pytest.raises(UserError, match=r"changed settings \(epochs 1 -> 2, seed 0 -> 1\)"):
        finetune(_cfg(photos, tmp_path / "b", epochs=2, resume=True, seed=1, **kw))
    more = dict(epochs=2, resume=True, allow_change=("epochs",))
    resumed = finetune(_cfg(photos, tmp_path / "b", **more, **kw))
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    for k, v in a["trunk"].items():
        assert torch.equal(v, b["trunk"][k]), k
    assert torch.equal(a["classifier"]["weight"], b["classifier"]["weight"])
    assert straight["top1"] == resumed["top1"]
    metrics = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,loss,train_top1,lr,head_lr")
    assert [line.split(",")[0] for line in metrics[1:]] == ["1", "2"]
    first = metrics[1].split(",")
    assert float(first[3]) == pytest.approx(0.05) and float(first[4]) == pytest.approx(0.2)


def test_resume_refuses_changed_lr_and_overwrite_replaces(photos, tmp_path):
    kw = dict(percent=10, batch_size=8, epochs=1)
    finetune(_cfg(photos, tmp_path / "r", lr=0.05, **kw))
    with pytest.raises(UserError, match=r"changed settings \(lr 0\.05 -> 0\.1\); pass") as err:
        finetune(_cfg(photos, tmp_path / "r", lr=0.1, resume=True, **kw))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"\(epochs 1 -> 2\)"):  # more epochs only when allowed
        finetune(_cfg(photos, tmp_path / "r", lr=0.05, resume=True, **{**kw, "epochs": 2}))
    finetune(_cfg(photos, tmp_path / "r", lr=0.1, overwrite=True, **kw))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.1
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["command"] == "transfer lowshot" and len(run["invocations"]) == 1
    metrics = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["1"]  # the old run's rows are gone


# --------------------------------------------------------------------------- CLI and Table 3


def test_cli_writes_runs_subset_and_table(photos, trained, tmp_path, monkeypatch):
    out, _ = trained
    args = [
        "--weights",
        f"mine={out / 'checkpoint.pth'}",
        "--weights",
        "random:resnet18@0.125",
        "--data",
        str(photos),
        "--percent",
        "10",
        "--per-class",
        "200",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "64",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
    ]
    result = CliRunner().invoke(lowshot, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "mine" / "10pct"
    res = json.loads((run / "results.json").read_text())
    listed = (run / "subset.txt").read_text().splitlines()
    per_class = {c: sum(line.startswith(c + "/") for line in listed) for c in PHOTOS}
    assert res["per_class"] == per_class
    assert set(res["short_classes"]) == set(PHOTOS)  # fewer than 200 of each
    assert res["short_classes"]["coffee"] == {"asked": 200, "available": 45}
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01 * 64 / 256  # auto_scale
    md = (tmp_path / "runs" / "table3.md").read_text()
    assert "| Method | 10% |" in md and "| mine |" in md and "| random:resnet18@0.125 |" in md
    # A run's config.json, read back with --config, asks for the same fine-tuning.
    import transfer.lowshot

    seen = []

    def capture(cfg):
        seen.append(cfg)
        raise UserError("stop after the first configuration")

    with monkeypatch.context() as m:
        m.setattr(transfer.lowshot, "finetune", capture)
        CliRunner().invoke(lowshot, ["--config", str(run / "config.json")])
    asked = dataclasses.asdict(seen[0])
    recorded = json.loads((run / "config.json").read_text())
    recorded.pop("out")
    assert {k: v for k, v in asked.items() if k != "out"} == {
        **recorded,
        "allow_change": tuple(recorded["allow_change"]),
    }
    bad = tmp_path / "bad.txt"
    bad.write_text("coffee/nope.png\n")
    result = CliRunner().invoke(
        lowshot, [*args[:-2], "--split-file", str(bad), "--out", str(tmp_path / "bad")]
    )
    assert isinstance(result.exception, UserError)
    assert f"{bad}:1:" in str(result.exception)


def test_table3_layout(tmp_path):
    cells = {("pirl", 1): 57.2, ("pirl", 10): 83.8, ("jigsaw", 1): 45.3, ("npid", 10): 81.5}
    for (m, p), top5 in cells.items():
        d = tmp_path / m / f"{p}pct"
        d.mkdir(parents=True)
        (d / "results.json").write_text(
            json.dumps({"method": m, "percent": p, "top1": top5 / 2, "top5": top5})
        )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"map": 1.0}))
    df = table3(read_runs([tmp_path]))
    assert list(df.columns) == ["Method", "1%", "10%"]
    assert markdown_table(df) == (
        "| Method | 1% | 10% |\n|---|---:|---:|\n| jigsaw | 45.3 | - |\n"
        "| npid | - | 81.5 |\n| pirl | 57.2 | 83.8 |\n"
    )
    with pytest.raises(UserError, match="also in"):
        table3(read_runs([tmp_path, tmp_path / "pirl"]))
