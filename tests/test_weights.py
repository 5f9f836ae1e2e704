"""Every checkpoint reader gives back the same bits; writers round-trip; unsafe files refused."""

from __future__ import annotations

import os
import pickle
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from pirl.errors import UserError
from pirl.heads import PirlHeads
from pirl.trunk import build_trunk
from pirl.weights import (
    from_detectron2,
    load_encoder,
    read_checkpoint,
    save_detectron2,
    save_torchvision,
    to_detectron2,
)


def d2_name(key: str) -> str:
    """detectron2's published torchvision->d2 renaming, written as its plain string replaces."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    """One random torchvision ResNet-50 state dict (fc included), built once per module."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for m in model.modules():  # non-trivial BN statistics so a dropped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trunk_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def pirl_heads_state(in_dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in PirlHeads(in_dim, 128, 9).state_dict().items()}


def vissl_pirl_heads(h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VISSL's PIRL heads: head 0 on patches (mlp, siamese_concat_view, mlp), head 1 on images."""
    return {
        "0.0.clf.0.weight": h["g.proj.weight"],
        "0.0.clf.0.bias": h["g.proj.bias"],
        "0.2.clf.0.weight": h["g.combine.weight"],
        "0.2.clf.0.bias": h["g.combine.bias"],
        "1.0.clf.0.weight": h["f.proj.weight"],
        "1.0.clf.0.bias": h["f.proj.bias"],
    }


def native(sd: dict[str, torch.Tensor]) -> dict:
    return {
        "trunk": trunk_of(sd),
        "heads": pirl_heads_state(2048),
        "memory": {"bank": torch.randn(37, 128)},
        "nce": {"z_image": torch.tensor(1.5)},
        "optimizer": {"state": {}},
        "epoch": 3,
        "step": 10,
        "rng": {
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
        },
        "config": {"arch": "resnet50", "width": 1.0, "method": "pirl"},
        "version": 1,
    }


def vissl(sd: dict, prefix: str = "_feature_blocks.", heads: dict | None = None) -> dict:
    model = {"trunk": {prefix + k: v for k, v in trunk_of(sd).items()}}
    if heads is not None:
        model["heads"] = heads
    return {
        "phase_idx": 4,
        "iteration": 100,
        "classy_state_dict": {
            "base_model": {"model": model, "meta": {}},
            "loss": {"memory_bank": torch.randn(41, 128)},
        },
    }


def moco(sd: dict[str, torch.Tensor]) -> dict:
    state = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    state.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in sd.items()})
    state["module.queue"] = torch.randn(128, 65)
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}}


def pycontrast(sd: dict[str, torch.Tensor]) -> dict:
    h = pirl_heads_state(2048)
    state = {f"module.encoder.{k}": v for k, v in trunk_of(sd).items()}
    state.update(
        {
            "module.head.0.weight": h["f.proj.weight"],
            "module.head.0.bias": h["f.proj.bias"],
            "module.head_jig.fc1.weight": h["g.proj.weight"],
            "module.head_jig.fc1.bias": h["g.proj.bias"],
            "module.head_jig.fc2.weight": h["g.combine.weight"],
            "module.head_jig.fc2.bias": h["g.combine.bias"],
        }
    )
    return {"model": state, "contrast": {"memory": torch.randn(43, 128)}, "epoch": 5, "opt": {}}


LAYOUTS = {
    "native": (native, "native"),
    "torchvision": (lambda sd: dict(sd), "torchvision"),
    "vissl": (lambda sd: vissl(sd), "vissl"),
    "vissl-base-model": (lambda sd: vissl(sd, "base_model._feature_blocks."), "vissl"),
    "moco": (moco, "moco"),
    "pycontrast": (pycontrast, "pycontrast"),
    "plain-module": (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, "plain"),
    "plain-backbone": (lambda sd: {f"backbone.{k}": v for k, v in sd.items()}, "plain"),
    "plain-model": (lambda sd: {"model": {f"model.{k}": v for k, v in sd.items()}}, "plain"),
    "plain-module-encoder": (
        lambda sd: {"state_dict": {f"module.encoder.{k}": v for k, v in sd.items()}},
        "plain",
    ),
}


def assert_same_trunk(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    ref = trunk_of(ref)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_reader_gives_identical_trunk(layout: str, r50: dict, tmp_path: Path) -> None:
    build, fmt = LAYOUTS[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(build(r50), path)
    enc = load_encoder(path)
    assert (enc.format, enc.arch, enc.width) == (fmt, "resnet50", 1.0)
    assert_same_trunk(enc.trunk.state_dict(), r50)
    assert not enc.trunk.training
    forced = load_encoder(path, fmt=fmt, arch="resnet50")
    assert forced.format == fmt
    path.unlink()


def test_detectron2_reader_gives_identical_trunk(r50: dict, tmp_path: Path) -> None:
    path = tmp_path / "r50.pkl"
    model = {d2_name(k): v.numpy() for k, v in r50.items()}  # the official script keeps fc
    with open(path, "wb") as fh:
        pickle.dump(
            {"model": model, "__author__": "torchvision", "matching_heuristics": True},
            fh,
            protocol=2,
        )
    enc = load_encoder(path)
    assert (enc.format, enc.arch) == ("detectron2", "resnet50")
    assert_same_trunk(enc.trunk.state_dict(), r50)
    path.unlink()


def test_heads_and_memory_are_read(r50: dict, tmp_path: Path) -> None:
    h = pirl_heads_state(2048)
    cases = {
        "native": native(r50),
        "vissl": vissl(r50, heads=vissl_pirl_heads(h)),
        "pycontrast": pycontrast(r50),
    }
    rows = {"native": 37, "vissl": 41, "pycontrast": 43}
    x = torch.randn(4, 2048)
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        enc = load_encoder(path)
        assert enc.memory_size == rows[name] and enc.unmapped_heads == ()
        got = enc.heads.state_dict()
        assert got.keys() == h.keys() and all(torch.equal(got[k], h[k]) for k in h), name
        expected_f = F.normalize(x @ h["f.proj.weight"].T + h["f.proj.bias"], dim=1)
        torch.testing.assert_close(enc.heads.f(x), expected_f, rtol=0, atol=1e-6)
        path.unlink()
    path = tmp_path / "moco.pth"
    torch.save(moco(r50), path)
    enc = load_encoder(path)
    assert enc.memory_size == 65 and enc.heads is None
    path.unlink()


def test_vissl_heads_that_are_not_pirl_are_reported_unmapped(tmp_path: Path) -> None:
    small = build_trunk("resnet18", 0.125).state_dict()
    heads = {
        "0.clf.0.weight": torch.randn(128, 64),
        "0.clf.0.bias": torch.randn(128),
        "0.clf.1.weight": torch.ones(128),
        "0.clf.1.bias": torch.zeros(128),
        "0.clf.1.running_mean": torch.zeros(128),
        "0.clf.1.running_var": torch.ones(128),
    }
    path = tmp_path / "simclr.torch"
    torch.save(vissl(small, heads=heads), path)
    enc = load_encoder(path)
    assert enc.heads is None
    assert set(enc.unmapped_heads) == set(heads)


def test_native_to_detectron2_to_torchvision_is_exact(r50: dict, tmp_path: Path) -> None:
    torch.save(native(r50), tmp_path / "native.pth")
    start = load_encoder(tmp_path / "native.pth")
    save_detectron2(start.trunk.state_dict(), tmp_path / "out.pkl")

    d2 = read_checkpoint(tmp_path / "out.pkl")
    assert d2["__author__"] == "pirl-tools" and d2["matching_heuristics"] is True
    ref = trunk_of(r50)
    assert set(d2["model"]) == {d2_name(k) for k in ref}
    assert "res5.0.shortcut.norm.running_var" in d2["model"]
    for k, v in ref.items():
        arr = d2["model"][d2_name(k)]
        assert isinstance(arr, np.ndarray) and np.array_equal(arr, v.numpy()), k

    save_torchvision(load_encoder(tmp_path / "out.pkl").trunk.state_dict(), tmp_path / "tv.pth")
    model = torchvision.models.resnet50()
    result = model.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    assert_same_trunk(trunk_of(model.state_dict()), r50)

    model.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(start.trunk.pooled(x), model.eval()(x), rtol=0, atol=1e-6)
    for name in ("native.pth", "out.pkl", "tv.pth"):
        (tmp_path / name).unlink()


def test_detectron2_names_invert(r50: dict) -> None:
    names = {k: d2_name(k) for k in r50}
    d2 = to_detectron2(r50)
    assert set(d2) == set(names.values())
    back = from_detectron2(d2)
    assert back.keys() == r50.keys() and all(torch.equal(back[k], r50[k]) for k in r50)


@pytest.mark.parametrize(
    "arch,width",
    [("resnet18", 0.125), ("resnet34", 0.125), ("resnet50", 0.25), ("resnet101", 0.125)],
)
def test_architecture_is_inferred(arch: str, width: float, tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = build_trunk(arch, width).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "w.pth")
    enc = load_encoder(tmp_path / "w.pth")
    assert (enc.arch, enc.width) == (arch, width)
    assert enc.trunk.channels["conv1"] == int(64 * width)
    assert_same_trunk(enc.trunk.state_dict(), state)


class RunsShell:
    """Unpickling this runs a shell command: the shape of a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_evil(kind: str, path: Path, marker: Path) -> None:
    payload = {
        "model": {"stem.conv1.weight": np.zeros((8, 3, 7, 7), np.float32)},
        "extra": RunsShell(marker),
    }
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        payload["conv1.weight"] = torch.zeros(8, 3, 7, 7)
        torch.save(payload, path, _use_new_zipfile_serialization=(kind == "torch-zip"))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip", "torch-legacy"])
def test_code_carrying_file_is_refused(kind: str, tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pkl", tmp_path / "pwned"
    _write_evil(kind, path, marker)
    with pytest.raises(UserError, match="refused") as err:
        load_encoder(path)
    msg = str(err.value)
    assert str(path) in msg and "system" in msg and "\n" not in msg
    assert not marker.exists()
    # Control: the payload is live, so the check above can fail.
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_numpy_rng_state_needs_and_gets_the_allowlist(tmp_path: Path) -> None:
    small = build_trunk("resnet18", 0.125).state_dict()
    torch.save(
        {"trunk": small, "rng": {"numpy": np.random.get_state()}, "version": 1}, tmp_path / "n.pth"
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "n.pth", weights_only=True)
    assert load_encoder(tmp_path / "n.pth").format == "native"


def _one_line_error(path: Path, pattern: str, **kwargs) -> str:
    with pytest.raises(UserError, match=pattern) as err:
        load_encoder(path, **kwargs)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    return msg


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.pth", "no such file")
    state = build_trunk("resnet18", 0.125).state_dict()
    torch.save(state, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "cut.pth", "truncated")
    save_detectron2(state, tmp_path / "whole.pkl")
    data = (tmp_path / "whole.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[: len(data) // 2])
    _one_line_error(tmp_path / "cut.pkl", "truncated")


def test_unknown_layout(tmp_path: Path) -> None:
    torch.save({"weights": {"foo.bar": torch.zeros(3)}, "epoch": 1}, tmp_path / "u.pth")
    msg = _one_line_error(tmp_path / "u.pth", "unknown checkpoint layout")
    assert "weights, epoch" in msg
    torch.save(build_trunk("resnet18", 0.125).state_dict(), tmp_path / "tv.pth")
    _one_line_error(tmp_path / "tv.pth", "not a moco checkpoint", fmt="moco")


def test_wrong_architecture_lists_keys(r50: dict, tmp_path: Path) -> None:
    torch.save(r50, tmp_path / "r50.pth")
    msg = _one_line_error(tmp_path / "r50.pth", "do not fit resnet18", arch="resnet18")
    assert "unexpected layer1.0.bn3.bias" in msg and "(" in msg and "in all)" in msg
    (tmp_path / "r50.pth").unlink()


def test_wrong_shape_and_unknown_depth(tmp_path: Path) -> None:
    state = build_trunk("resnet18", 0.125).state_dict()
    bad = dict(state, **{"layer2.1.conv1.weight": torch.zeros(16, 16, 5, 5)})
    torch.save(bad, tmp_path / "shape.pth")
    msg = _one_line_error(tmp_path / "shape.pth", "wrong shape")
    assert "layer2.1.conv1.weight (16, 16, 5, 5) vs (16, 16, 3, 3)" in msg
    deeper = dict(
        state,
        **{
            k.replace("layer3.1.", "layer3.2."): v
            for k, v in state.items()
            if k.startswith("layer3.1.")
        },
    )
    torch.save(deeper, tmp_path / "deep.pth")
    _one_line_error(tmp_path / "deep.pth", r"no known ResNet has basic blocks \[2, 2, 3, 2\]")


def test_random_spec_is_seeded_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a = load_encoder("random:resnet18@0.25", seed=3)
    b = load_encoder("random:resnet18@0.25", seed=3)
    c = load_encoder("random", arch="resnet18", seed=4)
    assert torch.equal(before, torch.get_rng_state())
    assert (a.format, a.arch, a.width) == ("random", "resnet18", 0.25)
    assert a.trunk.channels["conv1"] == 16
    assert torch.equal(a.trunk.conv1.weight, b.trunk.conv1.weight)
    assert (c.arch, c.width) == ("resnet18", 1.0)
    assert not torch.equal(
        a.trunk.layer1[0].conv1.weight[:16, :16], c.trunk.layer1[0].conv1.weight[:16, :16]
    )
    with pytest.raises(UserError, match="unknown architecture 'resnet7'"):
        load_encoder("random:resnet7")
    with pytest.raises(UserError, match="not a number"):
        load_encoder("random:resnet18@wide")


def test_plain_pickled_containers_of_tensors_and_arrays_load(tmp_path: Path) -> None:
    """state_dict() is an OrderedDict: plain-pickled (not torch.save), it holds nothing that
    runs code and must load, as must dicts, lists and tuples of tensors and arrays."""
    state = build_trunk("resnet18", 0.125).state_dict()
    (tmp_path / "od.pkl").write_bytes(pickle.dumps(state, protocol=4))
    enc = load_encoder(tmp_path / "od.pkl")
    assert enc.format == "torchvision" and enc.arch == "resnet18"
    for k, v in enc.trunk.state_dict().items():
        assert torch.equal(v, state[k].float() if v.is_floating_point() else state[k]), k
    as_numpy = {"model": [(k, v.numpy()) for k, v in state.items()], "epoch": (1, 2)}
    (tmp_path / "np.pkl").write_bytes(pickle.dumps(as_numpy, protocol=2))
    assert read_checkpoint(tmp_path / "np.pkl")["epoch"] == (1, 2)


def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path: Path) -> None:
    state = build_trunk("resnet18", 0.125).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    state["layer3.1.bn2.running_var"][3] = float("inf")
    torch.save(state, tmp_path / "nan.pth")
    msg = _one_line_error(tmp_path / "nan.pth", "layer2.0.conv1.weight holds 1 NaN or infinite")
    assert "diverged" in msg


def test_safetensors_are_read_and_written(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from pirl_tools.main import main

    state = build_trunk("resnet18", 0.125).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "t.safetensors"))
    enc = load_encoder(tmp_path / "t.safetensors")
    assert enc.format == "torchvision" and enc.arch == "resnet18"
    out = tmp_path / "back.safetensors"
    res = CliRunner().invoke(
        main, ["weights", "convert", str(tmp_path / "t.safetensors"), "--to", "safetensors",
               "-o", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    back = load_encoder(out).trunk.state_dict()
    for k, v in enc.trunk.state_dict().items():
        assert torch.equal(back[k], v), k
    (tmp_path / "cut.safetensors").write_bytes(out.read_bytes()[:200])
    _one_line_error(tmp_path / "cut.safetensors", "unreadable, truncated")


def test_unknown_layout_names_no_flag_the_command_may_lack(tmp_path: Path) -> None:
    torch.save({"weights": {"foo.bar": torch.zeros(3)}}, tmp_path / "u.pth")
    msg = _one_line_error(tmp_path / "u.pth", "unknown checkpoint layout")
    assert "--format" not in msg and "layouts read: native, torchvision" in msg
