"""Unpickle checkpoint files without ever running code from them.

Third-party and our own files are untrusted alike: torch files load with `weights_only=True`
plus exactly numpy's array-reconstruction names, and plain pickles (detectron2 `.pkl`) go
through an unpickler that allows only those same names.
"""

from __future__ import annotations

import codecs
import collections
import io
import json
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pirl.errors import UserError

_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a numpy-array pickle needs, under both numpy 1 and numpy 2 module names."""
    core = getattr(np, "_core", None) or np.core
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles store bytes this way
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


def _storage_from_bytes(data: bytes) -> Any:
    """A tensor storage pickled on its own (plain `pickle.dump` of tensors), read back with
    torch's weights_only loader instead of the unrestricted one pickle would call."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _plain_globals() -> dict[tuple[str, str], Any]:
    """What a plain pickle of arrays, tensors and containers needs: numpy's names, OrderedDict
    (what `state_dict()` returns) and the tensor rebuild torch's weights_only loader allows."""
    return {
        **_numpy_globals(),
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowlist (it could run code)."""


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler resolving only the names of arrays, tensors and plain containers; anything
    else is refused."""

    _allowed = _plain_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise _RefusedGlobal(f"{module}.{name}")


def _refused(path: Path, name: str) -> UserError:
    return UserError(
        f"{path}: refused to load: it would import {name}, which can run code; only tensors, "
        "plain containers and numpy arrays are allowed in a checkpoint"
    )


def _unreadable(path: Path, exc: BaseException) -> UserError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{path}: unreadable, truncated or not a checkpoint ({reason[:160]})")


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, numpy arrays allowed (training states often hold them)."""
    safe: list[Any] = [(obj, f"{mod}.{name}") for (mod, name), obj in _numpy_globals().items()]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 rebuilds dtypes as these classes
    safe += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(exc))
        if found or "Weights only load failed" in str(exc):
            name = (found.group(1) or found.group(2)) if found else "a Python object"
            raise _refused(path, name) from None
        raise _unreadable(path, exc) from None
    except Exception as exc:  # torch reports corrupt archives as RuntimeError, EOFError, ...
        raise _unreadable(path, exc) from None


def _is_safetensors(head: bytes) -> bool:
    """safetensors files start with the header's length (8 bytes, little-endian) and then
    the JSON header itself."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**30


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (no code at all in the format) as a state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise _unreadable(path, exc) from None


def read_checkpoint(path: str | Path) -> Any:
    """Read a checkpoint file (torch, pickle or safetensors) without ever running code from it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    with open(path, "rb") as fh:
        head = fh.read(9)
        if head.startswith(b"PK"):
            return _torch_load(path)
        if _is_safetensors(head):
            return _safetensors_load(path)
        fh.seek(0)
        try:
            first = _SafeUnpickler(fh, encoding="latin1").load()
        except _RefusedGlobal as exc:
            raise _refused(path, str(exc)) from None
        except Exception as exc:  # any malformed byte stream: EOFError, UnpicklingError, ...
            raise _unreadable(path, exc) from None
    if isinstance(first, int) and first == _LEGACY_TORCH_MAGIC:
        return _torch_load(path)
    return first
