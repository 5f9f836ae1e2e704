import numpy as np
import pytest
import torch
from sklearn.metrics import precision_recall_curve
from sklearn.svm import LinearSVC

from transfer.classifiers import (
    COSTS,
    LinearProbe,
    envelope_ap,
    fit_path,
    kfold,
    scaled_schedule,
    solve_squared_hinge,
    topk_correct,
    train_probes,
    voc07_svm,
)


def _envelope_by_hand(scores, labels):
    """VOC 2010+ AP from sklearn's precision/recall points: drop ignored, lift precision."""
    keep = labels != 0
    prec, rec, _ = precision_recall_curve(labels[keep] > 0, scores[keep])
    prec, rec = prec[::-1], rec[::-1]  # increasing recall
    env = np.maximum.accumulate(prec[::-1])[::-1]
    return float(np.sum(np.diff(rec) * env[1:]))


def test_envelope_ap_hand_cases():
    # ranks: + - + -  -> precision at the positives 1 and 2/3
    s = torch.tensor([[0.9], [0.8], [0.7], [0.1]])
    assert envelope_ap(s, torch.tensor([[1], [-1], [1], [-1]])).item() == pytest.approx(
        (1 + 2 / 3) / 2
    )
    # - + + : precision 1/2 then 2/3; the envelope lifts the first to 2/3
    s3 = torch.tensor([[3.0], [2.0], [1.0]])
    assert envelope_ap(s3, torch.tensor([[-1], [1], [1]])).item() == pytest.approx(2 / 3)
    # an ignored (0) item between them changes nothing
    s4 = torch.tensor([[3.0], [2.5], [2.0], [1.0]])
    assert envelope_ap(s4, torch.tensor([[-1], [0], [1], [1]])).item() == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((200, 5))
    labels = rng.choice([1, 0, -1], size=(200, 5), p=[0.3, 0.1, 0.6])
    got = envelope_ap(torch.tensor(scores), torch.tensor(labels)).numpy()
    want = [_envelope_by_hand(scores[:, j], labels[:, j]) for j in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_solver_reaches_liblinear_optimum():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 20))
    y = np.where(x[:, 0] + 0.5 * rng.standard_normal(60) > 0, 1, -1)
    for c in (0.1, 10.0):
        ref = LinearSVC(C=c, class_weight={1: 2, -1: 1}, tol=1e-8, max_iter=100000).fit(x, y)
        cw = torch.tensor(np.where(y > 0, 2 * c, c))[:, None]
        feats = torch.tensor(np.hstack([x, np.ones((60, 1))]))
        z = solve_squared_hinge(feats, torch.tensor(y, dtype=torch.float64)[:, None], cw, tol=1e-8)
        np.testing.assert_allclose(z[0, :-1].numpy(), ref.coef_[0], rtol=1e-3, atol=1e-4)
        assert z[0, -1].item() == pytest.approx(ref.intercept_[0], rel=1e-3, abs=1e-4)


def test_gram_path_gives_liblinear_scores_when_samples_are_fewer_than_dims():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 100))
    y = np.where(x[:, 0] + 0.5 * rng.standard_normal(40) > 0, 1, -1)
    x_eval = rng.standard_normal((15, 100))
    cw = torch.tensor(np.where(y > 0, 2.0, 1.0))[:, None]  # class weights; costs below
    yt = torch.tensor(y, dtype=torch.float64)[:, None]
    costs = (0.1, 1.0, 1000.0)  # 1000: the separable, worst-conditioned end of the path
    got = fit_path(torch.tensor(x), yt, cw, costs, torch.tensor(x_eval), tol=1e-8)
    # the same through precomputed Gram blocks (as the CV folds and refit call it)
    gram = (torch.tensor(x @ x.T + 1), torch.tensor(x_eval @ x.T + 1))
    via_blocks = fit_path(torch.tensor(x), yt, cw, costs, torch.tensor(x_eval), gram, tol=1e-8)
    for i, c in enumerate(costs):
        ref = LinearSVC(C=c, class_weight={1: 2, -1: 1}, tol=1e-8, max_iter=1000000).fit(x, y)
        want = ref.decision_function(x_eval)
        np.testing.assert_allclose(got[i, :, 0].numpy(), want, atol=1e-4)
        np.testing.assert_allclose(via_blocks[i, :, 0].numpy(), want, atol=1e-4)


def _features(n, d, k, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    cls = rng.integers(0, k, n)
    x = np.maximum(0, 0.2 * centers[cls] + rng.standard_normal((n, d))).astype(np.float32)
    y = -np.ones((n, k), np.int8)
    y[np.arange(n), cls] = 1
    y[(y == 1) & (rng.random((n, k)) < 0.15)] = 0  # difficult
    return x, y


def _sklearn_protocol(xtr, ytr, xte, yte):
    xtr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    xte = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    aps = []
    for c in range(ytr.shape[1]):
        y = np.where(ytr[:, c] > 0, 1, -1)
        cv = []
        for cost in COSTS:
            total = 0.0
            for va in kfold(len(y)):
                tr = np.setdiff1d(np.arange(len(y)), va)
                svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, max_iter=5000)
                score = svm.fit(xtr[tr], y[tr]).decision_function(xtr[va])
                total += _envelope_by_hand(score, y[va])
            cv.append(total)
        svm = LinearSVC(C=COSTS[int(np.argmax(cv))], class_weight={1: 2, -1: 1}, max_iter=5000)
        aps.append(100 * _envelope_by_hand(svm.fit(xtr, y).decision_function(xte), yte[:, c]))
    return float(np.mean(aps))


@pytest.mark.parametrize("d", [32, 256])  # more samples than dims, and fewer (Gram path)
def test_voc07_map_agrees_with_linearsvc(d):
    x, y = _features(240, d, 3, seed=d)
    ours = voc07_svm(x[:120], y[:120], x[120:], y[120:])
    want = _sklearn_protocol(x[:120], y[:120], x[120:], y[120:])
    assert abs(ours["mAP"] - want) < 0.3
    assert 40 < want < 100  # a problem where the cost matters, not a trivial one
    assert len(ours["ap"]) == 3 and all(c in COSTS for c in np.round(ours["cost"], 6))


def test_schedules_scale_with_fewer_epochs():
    assert scaled_schedule("imagenet") == (28, (8, 16, 24))
    assert scaled_schedule("inat18", 84) == (84, (24, 48, 72))
    assert scaled_schedule("imagenet", 7) == (7, (2, 4, 6))  # 8/28*7 = 2, 16/28*7 = 4, 24/28*7 = 6
    assert scaled_schedule("places205", 2) == (2, (1,))


def test_topk_counts_against_numpy():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((50, 8))
    labels = rng.integers(0, 8, 50)
    rank = (logits > logits[np.arange(50), labels][:, None]).sum(1)  # 0 = best
    got = topk_correct(torch.tensor(logits), torch.tensor(labels))
    assert got == [int((rank < 1).sum()), int((rank < 5).sum())]
    # fewer classes than k: top-5 of 3 classes counts every row
    assert topk_correct(torch.tensor(logits[:, :3]), torch.tensor(labels % 3))[1] == 50


def test_probe_learns_separable_classes_and_fails_on_shuffled_labels():
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    centers = rng.standard_normal((4, 16)) * 3
    y = rng.integers(0, 4, 400)
    x = (centers[y] + rng.standard_normal((400, 16))).astype(np.float32)

    def batches(xs, ys, seed):
        order = np.random.default_rng(seed).permutation(len(xs))
        for i in range(0, len(xs), 32):
            j = order[i : i + 32]
            yield {"f": torch.tensor(xs[j])}, torch.tensor(ys[j])

    def run(labels):
        return train_probes(
            lambda e: batches(x[:300], labels[:300], e),
            lambda: batches(x[300:], y[300:], 0),
            {"f": (16, 16)},
            classes=4,
            epochs=8,  # PyTorch's Linear init starts from larger logits than std 0.01 did
            milestones=(6,),
            batch_size=32,
        )["f"]

    assert run(y)["top1"] > 95
    assert run(rng.permutation(y))["top1"] < 60


def test_probe_is_vissls_eval_mlp_by_hand():
    # Two rows of a (2 channels, 2 positions) map, channel-major: channel 0 holds 1, 3, 5, 7
    # and channel 1 holds 8, 2, 4, 6 over the batch and positions: both mean-centred
    # (means 4 and 5) to deviations of variance 5.
    x = torch.tensor([[1.0, 3.0, 8.0, 2.0], [5.0, 7.0, 4.0, 6.0]])
    probe = LinearProbe(channels=2, dim=4, classes=2)
    bn = probe.bn
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 2 and bn.affine
    assert (bn.eps, bn.momentum) == (1e-5, 0.1)  # VISSL HEAD.BATCHNORM_EPS / _MOMENTUM
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.5, 1.0]))
        probe.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, -1.0, 0.0]]))
        probe.fc.bias.copy_(torch.tensor([0.1, -0.2]))
    out = probe.train()(x)
    deviations = np.array([[-3, -1, 3, -3], [1, 3, -1, 1]]) / np.sqrt(5 + 1e-5)
    normed = deviations * [2, 2, -1, -1] + [0.5, 0.5, 1, 1]
    want = normed @ np.array([[1, 0, 0, 1], [0, 1, -1, 0]]).T + [0.1, -0.2]
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-6)
    # running statistics per channel: 0.1 of the batch mean, 0.9 + 0.1 x unbiased variance 20/3
    np.testing.assert_allclose(bn.running_mean.numpy(), [0.4, 0.5], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), [0.9 + 2 / 3] * 2, rtol=1e-6)
    out.sum().backward()
    assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0  # learnable affine
    with torch.no_grad():  # eval: each channel's running statistics over both its positions
        got = probe.eval()(x)
    mean, var = np.repeat([0.4, 0.5], 2), np.repeat([0.9 + 2 / 3] * 2, 2)
    normed = (x.numpy() - mean) / np.sqrt(var + 1e-5) * [2, 2, -1, -1] + [0.5, 0.5, 1, 1]
    want = normed @ np.array([[1, 0, 0, 1], [0, 1, -1, 0]]).T + [0.1, -0.2]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 3 channels"):
        LinearProbe(channels=3, dim=4, classes=2)


def test_probe_linear_keeps_pytorchs_init_and_bn_has_no_weight_decay():
    # VISSL's MLP head keeps nn.Linear's init (scaled by PARAMS_MULTIPLIER 1.0): weight and
    # bias uniform on +-1/sqrt(fan_in).
    torch.manual_seed(0)
    probe = LinearProbe(channels=64, dim=256, classes=400)
    bound = 1 / 16
    for p in (probe.fc.weight, probe.fc.bias):
        v = p.detach().numpy().ravel()
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.97 * bound
        assert v.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
        assert abs(v.mean()) < 4 * bound / np.sqrt(3 * v.size)
    # regularize_bn False, regularize_bias True (eval_resnet_8gpu_transfer_in1k_linear.yaml)
    groups = probe.param_groups(5e-4)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay == {
        id(probe.fc.weight): 5e-4,
        id(probe.fc.bias): 5e-4,
        id(probe.bn.weight): 0.0,
        id(probe.bn.bias): 0.0,
    }


@pytest.fixture(scope="module")
def bench_roots(tmp_path_factory):
    from transfer.datasets import build_embedded

    return build_embedded(tmp_path_factory.mktemp("emb"), n=60)


def _cli(args):
    from click.testing import CliRunner

    from pirl_tools.main import main

    return CliRunner().invoke(main, args)


def test_cli_voc07_writes_run_folder_and_reuses_features(bench_roots, tmp_path):
    import json

    args = [
        "transfer",
        "linear",
        "--weights",
        "random:resnet18@0.125",
        "--benchmark",
        "voc07",
        "--data",
        str(bench_roots["voc07"]),
        "--image-size",
        "32",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
    ]
    res = _cli(args)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["layer"] == "res5" and config["image_size"] == 32
    assert results["feature_dim"] == 64 * 4 and len(results["ap"]) == 10
    assert results["value"] == pytest.approx(np.mean(results["ap"]))
    assert "| random:resnet18@0.125 |" in (tmp_path / "run" / "row.md").read_text()
    cached = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(cached) == 2  # trainval and test
    # the same probe again is served from the cache, with the same numbers
    assert _cli([*args, "--overwrite"]).exit_code == 0
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["value"] == results["value"]
    assert sorted((tmp_path / "cache" / "features").glob("*.npy")) == cached


def test_cli_precomputed_features_match_the_library(tmp_path):
    import json

    x, y = _features(90, 24, 3, seed=5)
    split = (np.arange(90) % 3 != 0).astype(np.int64)
    for name, arr in [("x", x), ("y", y), ("s", split)]:
        np.save(tmp_path / f"{name}.npy", arr)
    res = _cli(
        [
            "transfer",
            "linear",
            "--features",
            str(tmp_path / "x.npy"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--split",
            str(tmp_path / "s.npy"),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "run" / "results.json").read_text())["value"]
    tr = split == 1
    assert got == pytest.approx(voc07_svm(x[tr], y[tr], x[~tr], y[~tr])["mAP"])
    np.save(tmp_path / "y.npy", y[:10])
    bad = _cli(
        [
            "transfer",
            "linear",
            "--features",
            str(tmp_path / "x.npy"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--split",
            str(tmp_path / "s.npy"),
        ]
    )
    assert bad.exit_code == 2 and "y.npy: expected an (90, classes) array" in bad.output


def test_cli_precomputed_vissl_labels_give_the_devkit_map(tmp_path):
    import json

    x, y = _features(90, 24, 3, seed=6)
    # the same labels as VISSL's create_voc_data_files.py writes them: 0 absent, -1 difficult
    vissl = np.select([y == 1, y == 0], [1, -1], 0).astype(np.int32)
    split = (np.arange(90) % 3 != 0).astype(np.int64)
    for name, arr in [("x", x), ("devkit", y), ("vissl", vissl), ("s", split)]:
        np.save(tmp_path / f"{name}.npy", arr)
    base = ["transfer", "linear", "--features", str(tmp_path / "x.npy"), "--split",
            str(tmp_path / "s.npy"), "--device", "cpu"]  # fmt: skip
    values = {}
    for labels, extra in [("devkit", []), ("vissl", ["--label-encoding", "vissl"])]:
        out = tmp_path / labels
        res = _cli([*base, "--labels", str(tmp_path / f"{labels}.npy"), "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        values[labels] = json.loads((out / "results.json").read_text())["value"]
        assert json.loads((out / "config.json").read_text())["label_encoding"] == labels
    tr = split == 1
    want = voc07_svm(x[tr], y[tr], x[~tr], y[~tr])["mAP"]
    assert values["devkit"] == pytest.approx(want) and values["vissl"] == pytest.approx(want)
    # read as devkit, the VISSL file would score absent images as ignored: a different mAP
    assert voc07_svm(x[tr], vissl[tr], x[~tr], vissl[~tr])["mAP"] > want + 1
    res = _cli([*base, "--labels", str(tmp_path / "vissl.npy"), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "vissl.npy: read as devkit" in res.output


def test_cli_linear_probe_on_imagefolder_and_user_errors(bench_roots, tmp_path):
    import json

    for extra in (["--no-augment"], ["--augment"]):
        res = _cli(
            [
                "transfer",
                "linear",
                "--weights",
                "random:resnet18@0.125",
                "--benchmark",
                "imagenet",
                "--data",
                str(bench_roots["imagenet"]),
                "--image-size",
                "32",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--num-workers",
                "0",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "run" / extra[0]),
                *extra,
            ]
        )
        assert res.exit_code == 0, res.output
        results = json.loads((tmp_path / "run" / extra[0] / "results.json").read_text())
        assert 0 <= results["top1"] <= results["top5"] <= 100
        assert results["epochs"] == 2 and results["milestones"] == [1]
    res = _cli(
        [
            "transfer",
            "linear",
            "--weights",
            "random",
            "--benchmark",
            "places205",
            "--data",
            str(tmp_path / "nothing"),
        ]
    )
    assert res.exit_code == 2 and "train_places205.csv: file not found" in res.output


def _probe_data(root, digit_images):
    """ImageFolder train/ (24 images) and val/ (12) of 3 classes: the ImageNet layout."""
    from tests.conftest import write_image_folder

    images, labels = digit_images
    keep = [i for i in range(len(labels)) if labels[i] < 3][:36]
    write_image_folder(root / "train", [images[i] for i in keep[:24]], labels[keep[:24]])
    write_image_folder(root / "val", [images[i] for i in keep[24:]], labels[keep[24:]])
    return root


PROBE_KW = dict(device="cpu", num_workers=0, image_size=32, epochs=3, batch_size=8, seed=2)


def _metrics(path):
    import csv

    return list(csv.DictReader(open(path, newline="")))


def test_layers_from_one_pass_equal_the_per_layer_runs(tmp_path, digit_images):
    import json

    from pirl.data import list_images
    from pirl.features import FeatureExtractor, center_crop_transform
    from pirl.safe_load import read_checkpoint
    from pirl.weights import load_encoder
    from transfer.linear_probe import run_linear

    data = _probe_data(tmp_path / "data", digit_images)
    out = tmp_path / "all"
    args = (
        "transfer linear --weights rnd=random:resnet18@0.125 --benchmark imagenet "
        f"--data {data} --layer conv1,res3,res5 --image-size 32 --epochs 3 --batch-size 8 "
        f"--seed 2 --device cpu --num-workers 0 --out {out}"
    ).split()
    result = _cli(args)
    assert result.exit_code == 0, result.output
    assert f"{out}/layers.md" in result.output
    together = json.loads((out / "results.json").read_text())
    rows = _metrics(out / "metrics.csv")
    assert list(rows[0]) == ["layer", "epoch", "loss", "lr", "val_top1", "val_top5"]
    classifier = read_checkpoint(out / "classifier.pth")
    enc = load_encoder("random:resnet18@0.125", seed=2)
    val = list_images(data / "val")
    for layer in ("conv1", "res3", "res5"):
        alone = run_linear(
            "rnd=random:resnet18@0.125", "imagenet", data, layer, tmp_path / layer, **PROBE_KW
        )
        got = together["layers"][layer]
        assert (got["top1"], got["top5"]) == (alone["top1"], alone["top5"]), layer
        mine = [{k: v for k, v in r.items() if k != "layer"} for r in rows if r["layer"] == layer]
        assert mine == [
            {k: v for k, v in r.items() if k != "layer"}
            for r in _metrics(tmp_path / layer / "metrics.csv")
        ]
        assert [float(r["val_top1"]) for r in mine][-1] == got["top1"]
        single = read_checkpoint(tmp_path / layer / "classifier.pth")["layers"][layer]
        for k, v in classifier["layers"][layer].items():
            assert torch.equal(v, single[k]), f"{layer}.{k}"
        # the saved classifier on features computed here gives the reported top-1
        dim, channels = classifier["shapes"][layer]
        probe = LinearProbe(channels, dim, 3)
        probe.load_state_dict(classifier["layers"][layer])
        ext = FeatureExtractor(enc.trunk, layer, device="cpu")
        feats = ext.extract(val, center_crop_transform(32), progress=False)
        with torch.no_grad():
            pred = probe.eval()(torch.from_numpy(np.asarray(feats, dtype=np.float32))).argmax(1)
        assert 100 * float((pred.numpy() == np.array(val.labels)).mean()) == pytest.approx(
            got["top1"]
        )
    table = (out / "layers.csv").read_text().splitlines()
    assert table[0] == "model,layer,dim,top1,top5" and len(table) == 4
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_resume_after_a_crash_equals_the_uninterrupted_run(
    tmp_path, digit_images, monkeypatch
):
    import transfer.classifiers as classifiers
    from pirl.safe_load import read_checkpoint
    from transfer.linear_probe import run_linear

    data = _probe_data(tmp_path / "data", digit_images)
    spec = "rnd=random:resnet18@0.125"
    full = run_linear(spec, "imagenet", data, "res2,res5", tmp_path / "full", **PROBE_KW)
    real = classifiers._evaluate
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the end of epoch 3: epochs 1 and 2 are checkpointed
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(classifiers, "_evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_linear(spec, "imagenet", data, "res2,res5", tmp_path / "cut", **PROBE_KW)
    monkeypatch.setattr(classifiers, "_evaluate", real)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pth")["epoch"] == 2
    resumed = run_linear(
        spec, "imagenet", data, "res2,res5", tmp_path / "cut", resume=True, **PROBE_KW
    )
    assert resumed["layers"] == full["layers"]
    assert _metrics(tmp_path / "cut" / "metrics.csv") == _metrics(tmp_path / "full" / "metrics.csv")
    a, b = (read_checkpoint(tmp_path / r / "classifier.pth")["layers"] for r in ("full", "cut"))
    for layer in a:
        for k in a[layer]:
            assert torch.equal(a[layer][k], b[layer][k]), f"{layer}.{k}"


def test_probe_resume_from_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, digit_images):
    from pirl.errors import UserError
    from pirl.safe_load import read_checkpoint
    from transfer.linear_probe import run_linear

    data = _probe_data(tmp_path / "data", digit_images)
    spec = "rnd=random:resnet18@0.125"
    run_linear(spec, "imagenet", data, "res5", tmp_path / "run", **PROBE_KW)
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoint.pth")
    ckpt["probes"]["res5"]["fc.weight"] = ckpt["probes"]["res5"]["fc.weight"][:, :3]
    torch.save(ckpt, tmp_path / "run" / "checkpoint.pth")
    with pytest.raises(UserError) as err:
        run_linear(spec, "imagenet", data, "res5", tmp_path / "run", resume=True, **PROBE_KW)
    assert "checkpoint.pth: cannot resume from this checkpoint (" in str(err.value)
    assert "\n" not in str(err.value)
