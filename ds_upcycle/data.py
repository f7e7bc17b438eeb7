"""Training data through `datasets`: load, tokenise, pack into fixed blocks, cache, shard by rank.

Documents are tokenised with the checkpoint's tokenizer, joined with EOS and cut into
``seq_len`` blocks, so every rank sees the same shapes (capacity-limited routing needs equal
token counts on every rank of an expert-parallel group; deepspeed issue #6809).

The order of blocks is a pure function of (seed, step): :class:`BlockSampler` maps an optimizer
step to the blocks each rank reads. A checkpoint only needs the step to resume at the next unseen
batch, and ranks read disjoint blocks of every global batch.

Shape legend: N blocks, L = seq_len.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ds_upcycle.config import DataConfig

SUFFIX_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def expand_paths(patterns: list[str], field: str) -> list[Path]:
    """Expand globs in order; every pattern must match at least one supported file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or (
            [pattern] if Path(pattern).exists() else []
        )
        if not matches:
            raise ValueError(f"{field} ({pattern!r}) matches no file; check the path or glob")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                raise ValueError(f"{field} ({m!r}) is a folder; give files or a glob like '{m}/*.txt'")
            if p.suffix.lower() not in SUFFIX_BUILDERS:
                raise ValueError(
                    f"{field} ({m!r}) has an unsupported suffix {p.suffix!r}; use one of " + ", ".join(SUFFIX_BUILDERS)
                )
            if not os.access(p, os.R_OK):
                raise ValueError(f"{field} ({m!r}) is not readable")
            files.append(p)
    return files


def _check_lines(path: Path, builder: str, text_field: str, skip_bad: bool) -> tuple[list[str] | None, int]:
    """Validate a .txt/.jsonl file line by line, so a bad record is reported by file and line.

    Returns (texts, skipped): texts is None when the file is clean and `datasets` can read it as
    is; otherwise the good records (only with skip_bad).
    """
    texts: list[str] = []
    skipped = 0
    dirty = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if not skip_bad:
                    raise ValueError(
                        f"{path} line {n} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the "
                        "file as UTF-8, or set data.skip_bad_records=true to skip such lines"
                    ) from None
                skipped, dirty = skipped + 1, True
                continue
            if builder == "text":
                texts.append(line)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if path.suffix.lower() == ".json" and n == 1 and line.lstrip().startswith("["):
                    return None, 0  # a JSON array file: let `datasets` parse it whole
                if not skip_bad:
                    raise ValueError(
                        f"{path} line {n} is not valid JSON ({e.msg}); fix the line, or set "
                        "data.skip_bad_records=true to skip malformed lines"
                    ) from None
                skipped, dirty = skipped + 1, True
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                if not skip_bad:
                    raise ValueError(
                        f"{path} line {n} has no string field data.text_field ({text_field!r}); its keys: "
                        f"{keys}. Set data.text_field to the right key"
                    )
                skipped, dirty = skipped + 1, True
                continue
            texts.append(record[text_field])
    if not any(t.strip() for t in texts):
        return [], skipped  # nothing to read (`datasets` refuses empty files)
    if builder == "text":
        return ("".join(texts).split("\n\n") if dirty else None), skipped
    return (texts if dirty else None), skipped


def load_texts(files: list[Path], text_field: str, skip_bad: bool = False) -> tuple[list[str], int]:
    """All documents of the files, in order, through `datasets`; returns (texts, skipped records).

    .txt files are one document per paragraph (blank-line separated); .jsonl/.json/.parquet
    read ``text_field``.
    """
    from datasets import load_dataset

    texts: list[str] = []
    skipped_total = 0
    for path in files:
        builder = SUFFIX_BUILDERS[path.suffix.lower()]
        clean = None
        if builder != "parquet":
            clean, skipped = _check_lines(path, builder, text_field, skip_bad)
            skipped_total += skipped
        if clean is not None:
            texts.extend(t for t in clean if t.strip())
            continue
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = load_dataset(builder, data_files=str(path), split="train", **kwargs)
        column = "text" if builder == "text" else text_field
        if column not in ds.column_names:
            raise ValueError(
                f"{path} has no column data.text_field ({text_field!r}); its columns: {ds.column_names}. "
                "Set data.text_field to the right one"
            )
        texts.extend(t for t in ds[column] if isinstance(t, str) and t.strip())
    return texts, skipped_total


def pack(texts: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Tokenise, join documents with EOS, cut into [N, L] blocks (the remainder is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
    ids: list[int] = []
    batch = 256
    for i in range(0, len(texts), batch):
        for doc in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    n = len(ids) // seq_len
    dtype = np.uint32 if tokenizer.vocab_size < 2**32 else np.int64
    return np.asarray(ids[: n * seq_len], dtype=dtype).reshape(n, seq_len)


def _fingerprint(files: list[Path], tokenizer, seq_len: int, text_field: str, skip_bad: bool) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps([len(vocab), tokenizer.eos_token_id, seq_len, text_field, skip_bad]).encode())
    h.update(hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).digest())
    return h.hexdigest()[:20]


def _cached_blocks(cache_dir: Path, key: str, build, is_writer: bool) -> tuple[np.ndarray, bool]:
    """(blocks, from_cache). The cache is written atomically (tmp file + rename), so an
    interrupted run never leaves a truncated cache behind."""
    path = cache_dir / f"blocks_{key}.npy"
    if path.is_file():
        return np.load(path), True
    blocks = build()
    if is_writer:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, blocks)
        os.replace(tmp, path)
    return blocks, False


def load_blocks(
    patterns: list[str], field: str, tokenizer, cfg: DataConfig, cache_dir: Path, is_writer: bool = True
) -> tuple[np.ndarray, dict]:
    """Packed blocks [N, L] for local files, from the cache when the files and tokenizer are
    unchanged. Returns (blocks, info)."""
    files = expand_paths(patterns, field)
    info = {"files": [str(f) for f in files], "skipped": 0}
    shown = ", ".join(map(str, files))

    def build() -> np.ndarray:
        texts, info["skipped"] = load_texts(files, cfg.text_field, cfg.skip_bad_records)
        if not texts:
            raise ValueError(f"{field} ({shown}) holds no text; give non-empty files")
        return _checked(pack(texts, tokenizer, cfg.seq_len), field, shown, cfg.seq_len)

    key = _fingerprint(files, tokenizer, cfg.seq_len, cfg.text_field, cfg.skip_bad_records)
    blocks, info["cached"] = _cached_blocks(cache_dir, key, build, is_writer)
    counts = cache_dir / f"blocks_{key}.skipped"  # so a cached re-run reports the same count
    if info["cached"] and counts.is_file():
        info["skipped"] = int(counts.read_text())
    elif is_writer and not info["cached"]:
        counts.write_text(str(info["skipped"]))
    return blocks, info


def load_hub_blocks(cfg: DataConfig, tokenizer, max_blocks: int, cache_dir: Path, is_writer: bool = True):
    """Packed blocks from ``data.hub_dataset`` ("name" or "name:subset"), wherever the hub is
    reachable (a local dataset folder works too). With ``data.streaming`` only the first
    ``max_blocks`` blocks are read, so a corpus larger than the disk is fine."""
    from datasets import load_dataset

    name, _, subset = cfg.hub_dataset.partition(":")
    info = {"hub_dataset": cfg.hub_dataset, "split": cfg.hub_split, "streaming": cfg.streaming, "skipped": 0}

    def build() -> np.ndarray:
        try:
            ds = load_dataset(name, subset or None, split=cfg.hub_split, streaming=cfg.streaming)
        except Exception as e:  # the hub raises many types; the user needs the name and the cause
            raise ValueError(
                f"data.hub_dataset ({cfg.hub_dataset!r}, split {cfg.hub_split!r}) could not be loaded: {e}. "
                "Check the name and split, or use local files in data.train"
            ) from None
        texts: list[str] = []
        chars_needed = max_blocks * cfg.seq_len * 8  # generous: tokens are rarely under 8 chars
        for record in ds:
            text = record.get(cfg.text_field)
            if not isinstance(text, str):
                raise ValueError(
                    f"data.hub_dataset ({cfg.hub_dataset!r}) has no string field data.text_field "
                    f"({cfg.text_field!r}); its fields: {sorted(record)}"
                )
            texts.append(text)
            if cfg.streaming and sum(map(len, texts)) >= chars_needed:
                break
        blocks = _checked(pack(texts, tokenizer, cfg.seq_len), "data.hub_dataset", cfg.hub_dataset, cfg.seq_len)
        return blocks[:max_blocks] if cfg.streaming else blocks

    key_src = [cfg.hub_dataset, cfg.hub_split, cfg.streaming, max_blocks if cfg.streaming else 0]
    key = hashlib.sha256(json.dumps(key_src).encode() + _fingerprint([], tokenizer, cfg.seq_len, cfg.text_field,
                                                                     False).encode()).hexdigest()[:20]  # fmt: skip
    blocks, info["cached"] = _cached_blocks(cache_dir, key, build, is_writer)
    return blocks, info


def _checked(blocks: np.ndarray, field: str, shown: str, seq_len: int) -> np.ndarray:
    if len(blocks) == 0:
        raise ValueError(
            f"{field} ({shown}) has fewer tokens than one block of data.seq_len ({seq_len}); add text or lower data.seq_len"
        )
    return blocks


@dataclass(frozen=True)
class BlockSampler:
    """Deterministic, disjoint per-rank micro-batches as a pure function of the step.

    The stream of block indices is epoch after epoch of seeded permutations. Global micro-batch
    slot ``(step * accum + a) * world + rank`` takes the next ``micro`` indices of that stream,
    so within each global batch the ranks read disjoint blocks, and resuming at step s reads
    exactly what an uninterrupted run would.
    """

    num_blocks: int
    micro: int
    accum: int
    world: int
    rank: int
    seed: int

    def indices(self, step: int, accum_index: int) -> list[int]:
        slot = (step * self.accum + accum_index) * self.world + self.rank
        start = slot * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, self.num_blocks)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)


def batch_of(blocks: np.ndarray, indices: list[int]) -> torch.Tensor:
    return torch.from_numpy(blocks[indices].astype(np.int64))


def eval_batches(blocks: np.ndarray, micro: int, world: int, rank: int, count: int) -> list[torch.Tensor]:
    """``count`` micro-batches of held-out blocks for this rank, disjoint across ranks; every rank
    gets the same number (each must call every MoE layer the same number of times)."""
    per_rank = min(count, len(blocks) // (micro * world))
    if per_rank == 0:
        raise ValueError(
            f"the held-out split has {len(blocks)} blocks, fewer than one micro-batch per rank "
            f"({micro} x {world} ranks); add held-out text, raise data.eval_fraction or lower data.seq_len"
        )
    return [
        batch_of(blocks, list(range((b * world + rank) * micro, (b * world + rank + 1) * micro)))
        for b in range(per_rank)
    ]


def split_train_eval(blocks: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last ``eval_fraction`` of the blocks (contiguous text, never trained on)."""
    n_eval = int(round(len(blocks) * eval_fraction))
    if n_eval == 0 or n_eval >= len(blocks):
        raise ValueError(
            f"data.eval_fraction ({eval_fraction}) of {len(blocks)} blocks leaves no train or no held-out "
            "blocks; give data.eval files or more text"
        )
    return blocks[:-n_eval], blocks[-n_eval:]
