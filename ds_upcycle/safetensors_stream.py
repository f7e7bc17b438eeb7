"""HF-style sharded safetensors, read and written one tensor at a time, so peak memory is a tensor.

Reading: :func:`read_lazily` maps every tensor name of a folder's shards to its shape and a loader.
Writing: the safetensors layout is an 8-byte little-endian header length, a JSON header naming every
tensor's dtype, shape and byte range, then the raw bytes. Because the header only needs shapes
and dtypes, each shard's header is written first and the tensors are then produced and
appended one by one; nothing holds a whole shard, let alone a whole model.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    """Returns the tensor (any dtype; cast on write). Called exactly once."""


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def pack(items: list, nbytes: Callable[[object], int], limit: int) -> list[list]:
    """``items`` cut, in order, into runs of at most ``limit`` bytes (an item larger than that alone)."""
    runs: list[list] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if runs[-1] and size + n > limit:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += n
    return runs


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_shard_bytes: int) -> list[list[TensorSpec]]:
    return pack(specs, lambda spec: _nbytes(spec.shape, dtype), max_shard_bytes)


def write_sharded(
    specs: list[TensorSpec], out_dir: Path, dtype: torch.dtype, max_shard_bytes: int, progress=None
) -> dict[str, str]:
    """Write ``model-XXXXX-of-YYYYY.safetensors`` shards and ``model.safetensors.index.json``
    (or a single ``model.safetensors``). Every produced tensor must match its spec's shape.
    Returns {tensor name: file name}."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate tensor names in the export plan")  # internal invariant
    shards = plan_shards(specs, dtype, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in shard:
            nb = _nbytes(spec.shape, dtype)
            header[spec.name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + nb],
            }
            offset += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        with open(out_dir / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for spec in shard:
                t = spec.produce()
                if tuple(t.shape) != tuple(spec.shape):
                    raise ValueError(
                        f"tensor {spec.name} has shape {tuple(t.shape)}, expected {tuple(spec.shape)}; the "
                        "checkpoint does not match its recorded model config"
                    )
                data = t.detach().to(dtype=dtype, device="cpu").contiguous()
                f.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")  # no extra copy
                weight_map[spec.name] = fname
                total += data.numel() * data.element_size()
                if progress is not None:
                    progress(data.numel() * data.element_size())
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def read_lazily(folder: Path, keep: int = 3) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """{name: (shape, loader)} over a folder's ``*.safetensors`` shards, read lazily.

    The last ``keep`` tensors read stay in memory: an upcycled MLP writes gate, up and down once
    per expert, so each is read from disk once, and peak memory stays at a few tensors.
    """
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model folder ({str(folder)!r}) has no *.safetensors weights")
    recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def loader(f: Path, k: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if k not in recent:
                with safe_open(str(f), framework="pt") as g:
                    recent[k] = g.get_tensor(k)
                while len(recent) > keep:
                    recent.popitem(last=False)
            recent.move_to_end(k)
            return recent[k]

        return load

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = (tuple(h.get_slice(k).get_shape()), loader(f, k))
    return out
