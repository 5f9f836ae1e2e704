"""Load any published ResNet encoder safely, and write it back out for torchvision or detectron2.

Every evaluation command gets its encoder from `load_encoder`, so one reader decides what a
checkpoint holds. Third-party files are untrusted: torch files load with
`weights_only=True` plus exactly numpy's array-reconstruction names, and plain pickles
(detectron2 `.pkl`) go through an unpickler that allows only those same names.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pirl.engine import atomic_torch_save, atomic_write_bytes
from pirl.errors import UserError
from pirl.heads import PirlHeads
from pirl.safe_load import read_checkpoint
from pirl.trunk import ARCHS, Trunk, build_trunk

FORMATS = (
    "native", "torchvision", "vissl", "moco", "pycontrast", "plain", "detectron2", "caffe2",
)  # fmt: skip
PLAIN_PREFIXES = ("module.", "backbone.", "model.", "encoder.")
TRUNK_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
D2_PREFIXES = ("module.", "backbone.bottom_up.", "backbone.")
_SHOWN = 4  # how many offending keys an error message lists


# --------------------------------------------------------------------------- detectron2 names

_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(?:conv(\d)\.weight|bn(\d)\.(\w+))$")
_TV_SHORTCUT = re.compile(r"^layer([1-4])\.(\d+)\.downsample\.([01])\.(\w+)$")
_TV_STEM = re.compile(r"^(conv1\.weight|bn1\.(\w+)|fc\.(\w+))$")
_D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.conv(\d)\.(?:weight|norm\.(\w+))$")
_D2_SHORTCUT = re.compile(r"^res([2-5])\.(\d+)\.shortcut\.(?:weight|norm\.(\w+))$")
_D2_STEM = re.compile(r"^stem\.(?:conv1\.(?:weight|norm\.(\w+))|fc\.(\w+))$")


def _tv_to_d2_name(key: str) -> str:
    m = _TV_BLOCK.match(key)
    if m:
        stage, idx, conv, bn, attr = m.groups()
        base = f"res{int(stage) + 1}.{idx}"
        return f"{base}.conv{conv}.weight" if conv else f"{base}.conv{bn}.norm.{attr}"
    m = _TV_SHORTCUT.match(key)
    if m:
        stage, idx, part, attr = m.groups()
        base = f"res{int(stage) + 1}.{idx}.shortcut"
        return f"{base}.{attr}" if part == "0" else f"{base}.norm.{attr}"
    m = _TV_STEM.match(key)
    if m:
        whole, bn_attr, fc_attr = m.groups()
        if bn_attr:
            return f"stem.conv1.norm.{bn_attr}"
        return f"stem.fc.{fc_attr}" if fc_attr else "stem.conv1.weight"
    raise ValueError(f"not a torchvision ResNet key: {key}")


def _d2_to_tv_name(key: str) -> str:
    m = _D2_BLOCK.match(key)
    if m:
        stage, idx, conv, attr = m.groups()
        base = f"layer{int(stage) - 1}.{idx}"
        return f"{base}.bn{conv}.{attr}" if attr else f"{base}.conv{conv}.weight"
    m = _D2_SHORTCUT.match(key)
    if m:
        stage, idx, attr = m.groups()
        base = f"layer{int(stage) - 1}.{idx}.downsample"
        return f"{base}.1.{attr}" if attr else f"{base}.0.weight"
    m = _D2_STEM.match(key)
    if m:
        bn_attr, fc_attr = m.groups()
        if bn_attr:
            return f"bn1.{bn_attr}"
        return f"fc.{fc_attr}" if fc_attr else "conv1.weight"
    raise ValueError(f"not a detectron2 ResNet key: {key}")


def to_detectron2(trunk_state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Rename torchvision ResNet keys to detectron2's (stem, res2..res5, shortcut, convK.norm)."""
    return {_tv_to_d2_name(k): v.detach().cpu().numpy().copy() for k, v in trunk_state.items()}


def from_detectron2(d2_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename detectron2 ResNet keys back to torchvision's, values as tensors with the same bits."""
    return {_d2_to_tv_name(k): torch.as_tensor(np.array(v)) for k, v in d2_state.items()}


def save_torchvision(trunk_state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a torchvision state dict (no fc) that `resnetXX().load_state_dict` accepts."""
    path = Path(path)
    atomic_torch_save({k: v.detach().cpu().clone() for k, v in trunk_state.items()}, path)
    return path


def save_safetensors(trunk_state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write the trunk as safetensors (torchvision keys): a format that cannot carry code."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trunk_state.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


def save_detectron2(trunk_state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a detectron2 `.pkl` (MODEL.WEIGHTS) so PIRL weights can seed a Faster R-CNN."""
    path = Path(path)
    obj = {
        "model": to_detectron2(trunk_state),
        "__author__": "pirl-tools",
        "matching_heuristics": True,
    }
    atomic_write_bytes(path, pickle.dumps(obj, protocol=4))
    return path


# --------------------------------------------------------------------------- Caffe2 names

_C2_BLOCK = re.compile(r"^res([2-5])_(\d+)_branch(2a|2b|2c|1)_(w|bn_s|bn_b)$")
_C2_STEM = {"conv1_w": "conv1.weight", "res_conv1_bn_s": "bn1.weight", "res_conv1_bn_b": "bn1.bias"}
_C2_CONV = {"2a": "conv1", "2b": "conv2", "2c": "conv3"}
_C2_BN = {"2a": "bn1", "2b": "bn2", "2c": "bn3"}
# detectron2's input for MSRA weights: BGR in 0..255 minus this mean, std 1 (ImageNet's mean).
_RGB_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
BN_EPS = 1e-5  # torchvision's BatchNorm2d


def _c2_to_tv_name(key: str) -> str | None:
    if key in _C2_STEM:
        return _C2_STEM[key]
    m = _C2_BLOCK.match(key)
    if m is None:
        return None
    stage, idx, branch, kind = m.groups()
    base = f"layer{int(stage) - 1}.{idx}"
    if branch == "1":
        return (
            f"{base}.downsample.0.weight"
            if kind == "w"
            else f"{base}.downsample.1." + ("weight" if kind == "bn_s" else "bias")
        )
    if kind == "w":
        return f"{base}.{_C2_CONV[branch]}.weight"
    return f"{base}.{_C2_BN[branch]}." + ("weight" if kind == "bn_s" else "bias")


def from_caffe2(blobs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """MSRA Caffe2 ResNet blobs (res2_0_branch2a_w, ..._bn_s/_bn_b, conv1_w) as torchvision keys.

    Caffe2's frozen BN is an affine y = s * x + b with no statistics: running_mean 0 and
    running_var 1 - eps make torchvision's BN (eps 1e-5) that same affine. conv1 takes BGR
    0..255 minus ImageNet's mean; its input channels are reversed and scaled by 255 * std so
    it takes torchvision's normalised RGB. fc, momentum and other blobs are left out.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in blobs.items():
        name = _c2_to_tv_name(key)
        if name is None:
            continue
        out[name] = torch.as_tensor(np.array(value, dtype=np.float32))
    for name in [k for k in out if k.endswith(".weight") and out[k].ndim == 1]:
        stem = name[: -len("weight")]
        out[stem + "running_mean"] = torch.zeros_like(out[name])
        out[stem + "running_var"] = torch.full_like(out[name], 1.0 - BN_EPS)
    if "conv1.weight" in out:
        w = out["conv1.weight"].flip(1)
        out["conv1.weight"] = w * torch.tensor(_RGB_STD_255).view(1, 3, 1, 1)
    return out


def _c2_blobs(obj: Any) -> Mapping[str, Any] | None:
    """The blobs of an MSRA/Detectron `.pkl` ({'blobs': {...}} or the names at top level)."""
    if not isinstance(obj, Mapping):
        return None
    blobs = obj.get("blobs") if isinstance(obj.get("blobs"), Mapping) else obj
    return blobs if "conv1_w" in blobs and "res2_0_branch2a_w" in blobs else None


# --------------------------------------------------------------------------- layouts


@dataclass
class _Parsed:
    """What a reader found: trunk tensors under torchvision names, heads, memory size."""

    format: str
    trunk: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] | None = None
    unmapped_heads: tuple[str, ...] = ()
    memory_size: int | None = None


def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(torch.is_tensor(v) for v in obj.values())


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _trunk_only(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Keep the ResNet trunk keys, dropping fc and anything else stored beside them."""
    return {k: v for k, v in state.items() if k.startswith(TRUNK_ROOTS) and torch.is_tensor(v)}


def _natural(key: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]


def _linears(state: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(weight, bias) of every Linear in key order, or None if anything else (BN, ...) is there."""
    weights = sorted((k for k in state if k.endswith("weight")), key=_natural)
    if len(weights) * 2 != len(state):
        return None
    out = []
    for w in weights:
        b = w[: -len("weight")] + "bias"
        if b not in state or state[w].ndim != 2 or state[b].ndim != 1:
            return None
        out.append((state[w], state[b]))
    return out


def _map_pirl_heads(
    image: Mapping[str, torch.Tensor], patches: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """PirlHeads keys from a one-Linear image head and a Linear + concat + Linear patch head."""
    f, g = _linears(image), _linears(patches)
    if not f or not g or len(f) != 1 or len(g) != 2:
        return None
    (fw, fb), (gw, gb), (cw, cb) = f[0], g[0], g[1]
    out_dim, in_dim = fw.shape
    if gw.shape != fw.shape or cw.shape[0] != out_dim or cw.shape[1] % out_dim:
        return None
    return {
        "f.proj.weight": fw,
        "f.proj.bias": fb,
        "g.proj.weight": gw,
        "g.proj.bias": gb,
        "g.combine.weight": cw,
        "g.combine.bias": cb,
    }


def _memory_rows(state: Any, name: str) -> int | None:
    """Rows of the first 2-D tensor whose key mentions `name` (the memory bank)."""
    if not isinstance(state, Mapping):
        return None
    for k, v in state.items():
        if name in k and torch.is_tensor(v) and v.ndim == 2:
            return int(v.shape[0])
    return None


def _need(obj: Any, keys: Iterable[str], path: Path, fmt: str) -> Any:
    """Walk nested dict keys, failing with the first one that is missing."""
    walked = []
    for key in keys:
        if not isinstance(obj, Mapping) or key not in obj:
            where = " -> ".join(walked) or "top level"
            raise UserError(f"{path}: not a {fmt} checkpoint: no {key!r} under {where}")
        walked.append(key)
        obj = obj[key]
    return obj


def _read_native(obj: Any, path: Path) -> _Parsed:
    trunk = _need(obj, ["trunk"], path, "native")
    heads = obj.get("heads") if _is_state(obj.get("heads")) else None
    unmapped: tuple[str, ...] = ()
    if heads is not None and "f.proj.weight" not in heads:  # e.g. the Jigsaw-pretext classifier
        heads, unmapped = None, tuple(sorted(heads, key=_natural))
    memory = obj.get("memory")
    bank = memory.get("bank") if isinstance(memory, Mapping) else memory
    size = int(bank.shape[0]) if torch.is_tensor(bank) and bank.ndim == 2 else None
    return _Parsed("native", _trunk_only(trunk), heads, unmapped, memory_size=size)


def _read_vissl(obj: Any, path: Path) -> _Parsed:
    model = _need(obj, ["classy_state_dict", "base_model", "model"], path, "vissl")
    trunk, heads = (
        model[part] if isinstance(model.get(part), Mapping) else _strip(model, f"{part}.")
        for part in ("trunk", "heads")
    )
    for prefix in ("base_model.", "_feature_blocks."):
        if any(k.startswith(prefix) for k in trunk):
            trunk = _strip(trunk, prefix)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in heads.items():
        top, _, rest = k.partition(".")
        groups.setdefault(top, {})[rest] = v
    mapped = None
    if len(groups) == 2:  # PIRL: one head on the patches, one on the image, in either order
        a, b = (groups[k] for k in sorted(groups, key=_natural))
        mapped = _map_pirl_heads(b, a) or _map_pirl_heads(a, b)
    unmapped = () if mapped or not heads else tuple(sorted(heads, key=_natural))
    size = _memory_rows(obj["classy_state_dict"].get("loss"), "memory")
    return _Parsed("vissl", _trunk_only(trunk), mapped, unmapped, size)


def _read_moco(obj: Any, path: Path) -> _Parsed:
    state = _need(obj, ["state_dict"], path, "moco")
    trunk = _strip(state, "module.encoder_q.")
    if not trunk:
        raise UserError(f"{path}: not a moco checkpoint: no 'module.encoder_q.' keys in state_dict")
    queue = state.get("module.queue")
    size = int(queue.shape[1]) if torch.is_tensor(queue) and queue.ndim == 2 else None
    return _Parsed("moco", _trunk_only(trunk), memory_size=size)


def _read_pycontrast(obj: Any, path: Path) -> _Parsed:
    state = _need(obj, ["model"], path, "pycontrast")
    trunk = _strip(state, "module.encoder.")
    if not trunk:
        raise UserError(f"{path}: not a pycontrast checkpoint: no 'module.encoder.' keys in model")
    image, patches = _strip(state, "module.head."), _strip(state, "module.head_jig.")
    mapped = _map_pirl_heads(image, patches)
    rest = [k for k in state if k.startswith(("module.head.", "module.head_jig."))]
    unmapped = () if mapped else tuple(sorted(rest, key=_natural))
    return _Parsed(
        "pycontrast",
        _trunk_only(trunk),
        mapped,
        unmapped,
        _memory_rows(obj.get("contrast"), "memory"),
    )


def _read_torchvision(obj: Any, path: Path) -> _Parsed:
    if not _is_state(obj) or "conv1.weight" not in obj:
        raise UserError(f"{path}: not a torchvision state dict: no 'conv1.weight' at top level")
    return _Parsed("torchvision", _trunk_only(obj))


def _plain_state(obj: Any) -> dict[str, Any] | None:
    """The trunk of a state dict after peeling module./backbone./model./encoder. prefixes."""
    inner = ("state_dict", "model", "state") if isinstance(obj, Mapping) else ()
    candidates = [obj] + [obj.get(k) for k in inner]
    for state in candidates:
        if not _is_state(state):
            continue
        state = dict(state)
        for _ in range(len(PLAIN_PREFIXES) + 1):
            if "conv1.weight" in state:
                return state
            prefix = next((p for p in PLAIN_PREFIXES if any(k.startswith(p) for k in state)), None)
            if prefix is None:
                break
            state = _strip(state, prefix)
    return None


def _read_plain(obj: Any, path: Path) -> _Parsed:
    state = _plain_state(obj)
    if state is None:
        raise UserError(
            f"{path}: not a plain state dict: no 'conv1.weight' under any of "
            f"{', '.join(PLAIN_PREFIXES)} prefixes"
        )
    return _Parsed("plain", _trunk_only(state))


def _d2_state(obj: Any) -> dict[str, Any] | None:
    """detectron2 ResNet keys (stem.*, res2..res5.*) of a `.pkl` or a detectron2 training file."""
    if not isinstance(obj, Mapping):
        return None
    model = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    state = dict(model)
    if any(k.startswith("roi_heads.res5.") for k in state):  # R50-C4 keeps res5 in the box head
        state.update(
            {
                "backbone." + k[len("roi_heads.") :]: v
                for k, v in state.items()
                if k.startswith("roi_heads.res5.")
            }
        )
    for prefix in ("",) + D2_PREFIXES:
        if f"{prefix}stem.conv1.weight" in state:
            inner = _strip(state, prefix)
            return {
                k: v
                for k, v in inner.items()
                if k.startswith("stem.") or re.match(r"res[2-5]\.\d", k)
            }
    return None


def _read_detectron2(obj: Any, path: Path) -> _Parsed:
    state = _d2_state(obj)
    if state is None:
        raise UserError(f"{path}: not a detectron2 checkpoint: no 'stem.conv1.weight' in model")
    try:
        trunk = from_detectron2(state)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    return _Parsed("detectron2", _trunk_only(trunk))


def _read_caffe2(obj: Any, path: Path) -> _Parsed:
    blobs = _c2_blobs(obj)
    if blobs is None:
        raise UserError(f"{path}: not a Caffe2 checkpoint: no 'conv1_w' and 'res2_0_branch2a_w'")
    return _Parsed("caffe2", _trunk_only(from_caffe2(blobs)))


_READERS = {
    "native": _read_native,
    "torchvision": _read_torchvision,
    "vissl": _read_vissl,
    "moco": _read_moco,
    "pycontrast": _read_pycontrast,
    "plain": _read_plain,
    "detectron2": _read_detectron2,
    "caffe2": _read_caffe2,
}


def detect_format(obj: Any) -> str | None:
    """Name the layout of an unpickled checkpoint from its keys, or None if none fits."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("classy_state_dict"), Mapping):
        return "vissl"
    if isinstance(obj.get("trunk"), Mapping):
        return "native"
    if _d2_state(obj) is not None:
        return "detectron2"
    if _c2_blobs(obj) is not None:
        return "caffe2"
    state, model = obj.get("state_dict"), obj.get("model")
    if isinstance(state, Mapping) and any(k.startswith("module.encoder_q.") for k in state):
        return "moco"
    if isinstance(model, Mapping) and any(k.startswith("module.encoder.") for k in model):
        return "pycontrast"
    if _is_state(obj) and "conv1.weight" in obj:
        return "torchvision"
    if _plain_state(obj) is not None:
        return "plain"
    return None


def parse_checkpoint(obj: Any, path: Path, fmt: str | None = None) -> _Parsed:
    """Run the reader for `fmt` (or the detected layout) and insist it found a trunk."""
    if fmt is not None and fmt not in _READERS:
        raise UserError(f"{path}: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt is None and detect_format(obj) == "caffe2":
        raise UserError(
            f"{path}: Caffe2 (MSRA) weights put each downsampling block's stride in its 1x1 "
            "convolution, torchvision's ResNet in the 3x3, so here they would compute another "
            "function; --format caffe2 reads them anyway (right for weights trained with the "
            "stride in the 3x3)"
        )
    fmt = fmt or detect_format(obj)
    if fmt is None:
        keys = list(obj)[:_SHOWN] if isinstance(obj, Mapping) else [type(obj).__name__]
        raise UserError(
            f"{path}: unknown checkpoint layout: no ResNet trunk found (top level: "
            f"{', '.join(map(str, keys))}; layouts read: {', '.join(FORMATS)})"
        )
    parsed = _READERS[fmt](obj, path)
    if "conv1.weight" not in parsed.trunk:
        raise UserError(f"{path}: {fmt} checkpoint without a ResNet trunk (no conv1.weight)")
    return parsed


# --------------------------------------------------------------------------- architecture


def infer_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, float]:
    """(arch, width) from weights: conv3 tells the block, block counts the depth, conv1 width."""
    width = state["conv1.weight"].shape[0] / 64
    bottleneck = "layer1.0.conv3.weight" in state
    blocks = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    )
    for name, (block, layers) in ARCHS.items():
        if (block.__name__ == "Bottleneck") == bottleneck and tuple(layers) == blocks:
            return name, width
    kind = "bottleneck" if bottleneck else "basic"
    raise ValueError(f"no known ResNet has {kind} blocks {list(blocks)} per stage")


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys, key=_natural)
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _fit(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Strict load into a meta-device module, explaining a mismatch in one line naming the keys.

    Assigning the file's tensors (float32 kept bit for bit) skips a random initialisation that
    would only be overwritten.
    """
    expected = module.state_dict()
    for k, v in expected.items():  # older checkpoints lack BN's step counter; it is not a weight
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros((), dtype=v.dtype)
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if shapes:
        more = f", ... ({len(shapes)} in all)" if len(shapes) > _SHOWN else ""
        problems.append(f"wrong shape (file vs model) {', '.join(shapes[:_SHOWN])}{more}")
    if problems:
        raise UserError(f"{path}: weights do not fit {what}: {'; '.join(problems)}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)


# --------------------------------------------------------------------------- public API


@dataclass
class Encoder:
    """A loaded trunk (eval mode) with what the checkpoint said about itself."""

    trunk: Trunk
    heads: PirlHeads | None
    format: str
    arch: str
    width: float
    memory_size: int | None
    source: str
    fingerprint: str  # what decides the weights: file identity or random spec + seed
    unmapped_heads: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Trunk parameters (buffers excluded), as papers count them."""
        return sum(p.numel() for p in self.trunk.parameters())


def _random_encoder(spec: str, arch: str | None, seed: int) -> Encoder:
    """The seeded random trunk every table uses as its floor row."""
    _, _, rest = spec.partition(":")
    name, _, width_text = rest.partition("@")
    name = name or arch or "resnet50"
    if name not in ARCHS:
        raise UserError(f"{spec}: unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    try:
        width = float(width_text) if width_text else 1.0
    except ValueError:
        raise UserError(f"{spec}: width {width_text!r} is not a number") from None
    if width <= 0:
        raise UserError(f"{spec}: width must be positive")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = build_trunk(name, width)
    source = f"random:{name}@{width:g}"
    return Encoder(trunk.eval(), None, "random", name, width, None, source, f"{source}#{seed}")


def _file_identity(path: Path) -> str:
    """Resolved path, mtime and size: cheap, and a rewritten file never passes for the old one."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_mtime_ns}:{st.st_size}"


def load_encoder(
    spec: str | Path, arch: str | None = None, fmt: str | None = None, seed: int = 0
) -> Encoder:
    """The one way every command turns `--weights` into a trunk: detect, check, load."""
    text = str(spec)
    if text == "random" or text.startswith("random:"):
        return _random_encoder(text, arch, seed)
    path = Path(spec).expanduser()
    identity = _file_identity(path) if path.is_file() else None  # read_checkpoint names errors
    parsed = parse_checkpoint(read_checkpoint(path), path, fmt)
    try:
        inferred, width = infer_arch(parsed.trunk)
    except ValueError as exc:
        if arch is None:
            raise UserError(f"{path}: cannot tell the architecture: {exc}") from None
        width = parsed.trunk["conv1.weight"].shape[0] / 64
    if arch is not None and arch not in ARCHS:
        raise UserError(f"{path}: unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    arch = arch or inferred
    with torch.device("meta"):
        trunk = build_trunk(arch, width)
    _fit(trunk, dict(parsed.trunk), path, f"{arch} (width {width:g})")
    _require_finite(trunk, path)
    heads = None
    if parsed.heads is not None:
        out_dim, in_dim = parsed.heads["f.proj.weight"].shape
        n = parsed.heads["g.combine.weight"].shape[1] // out_dim
        if in_dim != trunk.out_dim:
            raise UserError(f"{path}: heads take {in_dim}-d input, the trunk gives {trunk.out_dim}")
        with torch.device("meta"):
            heads = PirlHeads(in_dim, out_dim, n)
        _fit(heads, dict(parsed.heads), path, f"PIRL heads ({in_dim}->{out_dim}, {n} patches)")
        _require_finite(heads, path)
        heads.eval()
    return Encoder(
        trunk.eval(),
        heads,
        parsed.format,
        arch,
        width,
        parsed.memory_size,
        str(path),
        f"{identity}:{parsed.format}:{arch}@{width:g}",
        parsed.unmapped_heads,
    )


def _require_finite(module: torch.nn.Module, path: Path) -> None:
    """Refuse weights holding NaN or infinity: every number computed from them would be noise
    that still looks like a result."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(
                f"{path}: {name} holds {bad} NaN or infinite values of {t.numel()}; "
                "these weights come from a diverged or corrupted run"
            )


def _heads_line(enc: Encoder) -> str:
    if enc.heads is not None:
        return "f, g (PIRL projection heads)"
    if enc.unmapped_heads:
        shown = ", ".join(enc.unmapped_heads[:3])
        return f"present but not PIRL's f and g ({len(enc.unmapped_heads)} tensors: {shown}, ...)"
    return "none"


def describe(enc: Encoder) -> list[str]:
    """The facts a user checks before trusting a checkpoint in an evaluation."""
    memory = f"{enc.memory_size} entries" if enc.memory_size is not None else "none"
    return [
        f"file: {enc.source}",
        f"format: {enc.format}",
        f"architecture: {enc.arch} (width {enc.width:g})",
        f"parameters: {enc.num_params}",
        f"heads: {_heads_line(enc)}",
        f"memory bank: {memory}",
    ]


_D2_DEPTH = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def detectron2_config(enc: Encoder) -> str:
    """The detectron2 settings under which torchvision-style weights mean what they meant."""
    ch = enc.trunk.channels
    return (
        f"MODEL.RESNETS.DEPTH {_D2_DEPTH[enc.arch]} MODEL.RESNETS.STEM_OUT_CHANNELS {ch['conv1']} "
        f"MODEL.RESNETS.RES2_OUT_CHANNELS {ch['res2']} MODEL.RESNETS.WIDTH_PER_GROUP {ch['conv1']} "
        "MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
        "MODEL.PIXEL_MEAN [123.675,116.28,103.53] MODEL.PIXEL_STD [58.395,57.12,57.375]"
    )
