"""Read back what a W&B offline run logged, from its run-*.wandb file (no wandb reader exists).

Format (wandb/sdk/internal/datastore.py in older releases): a 7-byte header (":W&B", magic
0xBEE1 little-endian, version byte), then LevelDB log framing in 32 KiB blocks. Each record has a
7-byte header (crc32c, uint16 length, type: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST); a block's tail
shorter than a header is zero padding. Payloads are wandb_internal_pb2.Record messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B datastore file"
    assert struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the end of the block or file
            pos += left
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body
            pending = b""


def read_history(run_file: Path) -> list[dict]:
    """Every history row (one wandb.log call) as {key: value}, with '_step'."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def read_config(run_file: Path) -> dict:
    from wandb.proto import wandb_internal_pb2

    out = {}
    for payload in _payloads(Path(run_file).read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        updates = rec.config.update if kind == "config" else rec.run.config.update if kind == "run" else []
        for item in updates:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def find_run_file(out_dir: Path) -> Path:
    files = sorted(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {out_dir}/wandb"
    return files[-1]
