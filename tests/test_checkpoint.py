"""The checkpoint commit and the per-rank checks on resume, on real files (no launcher needed; the
whole path runs in tests/test_scale.py and tests/test_reliability.py)."""

import json
import os
import pickle

import pytest
import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from ds_upcycle import checkpoint


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _part(folder, rank, files):
    part = {"files": {name: checkpoint.file_entry(folder / name) for name in files}, "hash_s": 0.5 + rank}
    (folder / f"{checkpoint.PART_PREFIX}{rank:05d}.json").write_text(json.dumps(part))


def test_commit_merges_every_ranks_part(tmp_path):
    for name in ("a.pt", "b.pt", "c.pt", "zero_to_fp32.py"):
        torch.save({"w": torch.full((4,), float(len(name)))}, tmp_path / name)
    _part(tmp_path, 0, ["a.pt"])
    _part(tmp_path, 1, ["b.pt", "c.pt"])
    manifest, ranks = checkpoint.commit(tmp_path, world=2)
    assert [r["hash_s"] for r in ranks] == [0.5, 1.5]
    assert sorted(manifest) == ["a.pt", "b.pt", "c.pt", "zero_to_fp32.py"]  # the unclaimed file hashed by rank 0
    assert json.loads((tmp_path / checkpoint.MANIFEST).read_text()) == manifest
    assert not list(tmp_path.glob(f"{checkpoint.PART_PREFIX}*"))
    assert manifest["c.pt"]["sha256"] == checkpoint.file_entry(tmp_path / "c.pt")["sha256"]


def test_resume_reads_only_checked_files(tmp_path):
    """What a rank's DeepSpeed reads goes through VerifiedIO: checked against the manifest and read
    with the safe unpickler; truncated, altered, unlisted and foreign files are refused by name."""
    good = {"module": {"w": torch.arange(6.0)}, "n": 3}
    torch.save(good, tmp_path / "mine.pt")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Exploit()))
    torch.save({"w": torch.zeros(2)}, tmp_path / "unlisted.pt")
    manifest = {n: checkpoint.file_entry(tmp_path / n) for n in ("mine.pt", "evil.pt")}
    io = checkpoint.VerifiedIO(TorchCheckpointEngine())
    io.folder, io.manifest = tmp_path, manifest
    loaded = io.load(str(tmp_path / "mine.pt"), map_location="cpu")
    assert torch.equal(loaded["module"]["w"], good["module"]["w"]) and io.verified == ["mine.pt"]
    with pytest.raises(ValueError, match=r"evil.pt holds objects outside the safe allow-list"):
        io.load(str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match=r"unlisted.pt is not in .*ds_upcycle_manifest.json"):
        io.load(str(tmp_path / "unlisted.pt"))
    data = (tmp_path / "mine.pt").read_bytes()
    (tmp_path / "mine.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    io.verified = []
    with pytest.raises(ValueError, match=r"mine.pt is corrupted \(SHA-256 mismatch\)"):
        io.load(str(tmp_path / "mine.pt"))
    (tmp_path / "mine.pt").write_bytes(data[:10])
    with pytest.raises(ValueError, match=r"mine.pt is truncated or altered \(10 bytes"):
        io.load(str(tmp_path / "mine.pt"))
    io.folder = None  # outside a resume, DeepSpeed's own engine reads as it always does
    assert torch.equal(io.load(str(tmp_path / "unlisted.pt"))["w"], torch.zeros(2))


def test_saves_are_recorded_per_rank(tmp_path):
    io = checkpoint.VerifiedIO(TorchCheckpointEngine())
    io.save({"w": torch.ones(3)}, str(tmp_path / "x.pt"))
    assert io.written == [tmp_path / "x.pt"] and (tmp_path / "x.pt").is_file()
    assert io.is_data_parallel_writer(0) and not io.is_decoupled()  # the rest is DeepSpeed's engine
