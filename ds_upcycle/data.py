"""Training data: prepare (read, tokenise in parallel, pack to disk), memory-mapped reads, the sampler.

Preparation streams the corpus: documents are read file by file (never the whole corpus at once),
tokenised in batches by a pool of ``data.num_proc`` processes (order kept), joined with EOS and cut
into ``seq_len`` blocks that are appended to an ``.npy`` file on disk. The finished file is renamed
into the cache atomically and every rank reads it memory-mapped, so no process holds the corpus or
its tokens in RAM. Equal-length blocks give every rank the same shapes (capacity-limited routing
needs equal token counts on every rank of an expert-parallel group; deepspeed issue #6809).

.txt and .jsonl files (and line-delimited .json) are read with the standard library alone;
``datasets`` is imported only for hub datasets and whole-array .json files, ``pyarrow`` only for
.parquet.

The order of blocks is a pure function of (seed, step): :class:`BlockSampler` maps an optimizer
step to the blocks each rank reads. A checkpoint only needs the step to resume at the next unseen
batch, and ranks read disjoint blocks of every global batch.

Shape legend: N blocks, L = seq_len.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ds_upcycle.config import DataConfig

if TYPE_CHECKING:
    from ds_upcycle.config import RunConfig

log = logging.getLogger("ds_upcycle")

SUFFIX_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

TOKENIZE_BATCH_CHARS = 1 << 20
"""Characters of text per tokenisation task (~1 MB: large enough to amortise a task's pickling)."""
POOL_MIN_BATCHES = 2
"""A worker pool starts only for corpora of at least this many batches (one batch gains nothing)."""
POLL_SECONDS = 1.0
"""How often a rank waiting for another rank's preparation looks for the finished cache file."""


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


# --------------------------------------------------------------------------------------------
# Reading documents, one at a time
# --------------------------------------------------------------------------------------------


class _Counts:
    """Running counts of one preparation, and the progress bar over the bytes read."""

    def __init__(self, bar=None) -> None:
        self.skipped = 0
        self.documents = 0
        self.bar = bar
        self._unreported = 0

    def read(self, nbytes: int) -> None:
        self._unreported += nbytes
        if self.bar is not None and self._unreported >= 1 << 20:  # tqdm.update per line would cost more than reading
            self.bar.update(self._unreported)
            self._unreported = 0

    def flush(self) -> None:
        if self.bar is not None:
            self.bar.update(self._unreported)
        self._unreported = 0


def _decode_lines(path: Path, skip_bad: bool, counts: _Counts) -> Iterator[tuple[int, str]]:
    """(line number, text) of each UTF-8 line, newlines normalised to "\\n" as in text mode."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            counts.read(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if not skip_bad:
                    raise ValueError(
                        f"{path} line {n} is not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the "
                        "file as UTF-8, or set data.skip_bad_records=true to skip such lines"
                    ) from None
                counts.skipped += 1
                continue
            if "\r" in line:  # universal newlines, as `datasets`' text builder reads (open() in text mode)
                line = line.replace("\r\n", "\n").replace("\r", "\n")
            yield n, line


def _paragraphs(path: Path, skip_bad: bool, counts: _Counts) -> Iterator[str]:
    """The blank-line separated documents of a .txt file: the same split as `datasets`' text
    builder with ``sample_by="paragraph"`` (split on "\\n\\n", empty pieces dropped), in chunks."""
    pending: list[str] = []
    size = 0
    for _, line in _decode_lines(path, skip_bad, counts):
        pending.append(line)
        size += len(line)
        if size >= TOKENIZE_BATCH_CHARS:
            parts = "".join(pending).split("\n\n")
            yield from (p for p in parts[:-1] if p.strip())
            pending, size = [parts[-1]], len(parts[-1])
    yield from (p for p in "".join(pending).split("\n\n") if p.strip())


def _json_records(path: Path, text_field: str, skip_bad: bool, counts: _Counts) -> Iterator[str]:
    """The text field of each line of a JSON-lines file; a .json file holding one JSON array is
    read whole through `datasets`."""
    for n, line in _decode_lines(path, skip_bad, counts):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if path.suffix.lower() == ".json" and n == 1 and line.lstrip().startswith("["):
                yield from _json_array(path, text_field)
                return
            if not skip_bad:
                raise ValueError(
                    f"{path} line {n} is not valid JSON ({e.msg}); fix the line, or set "
                    "data.skip_bad_records=true to skip malformed lines"
                ) from None
            counts.skipped += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            if not skip_bad:
                raise ValueError(
                    f"{path} line {n} has no string field data.text_field ({text_field!r}); its keys: "
                    f"{keys}. Set data.text_field to the right key"
                )
            counts.skipped += 1
            continue
        if record[text_field].strip():
            yield record[text_field]


def _json_array(path: Path, text_field: str) -> Iterator[str]:
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    if text_field not in ds.column_names:
        raise ValueError(
            f"{path} has no column data.text_field ({text_field!r}); its columns: {ds.column_names}. "
            "Set data.text_field to the right one"
        )
    for batch in ds.iter(batch_size=1024):
        yield from (t for t in batch[text_field] if isinstance(t, str) and t.strip())


def _parquet_rows(path: Path, text_field: str, counts: _Counts) -> Iterator[str]:
    """The text column of a .parquet file, one record batch at a time (pyarrow, a `datasets`
    dependency, reads it without a converted copy)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(
            f"{path} has no column data.text_field ({text_field!r}); its columns: {names}. "
            "Set data.text_field to the right one"
        )
    for i in range(pf.num_row_groups):
        counts.read(path.stat().st_size // pf.num_row_groups)  # the progress bar counts file bytes
        for batch in pf.iter_batches(batch_size=1024, row_groups=[i], columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())


def file_documents(path: Path, text_field: str, skip_bad: bool, counts: _Counts) -> Iterator[str]:
    """The non-blank documents of one file, in order: .txt paragraphs, or ``text_field`` of
    .jsonl/.json records and .parquet rows. Malformed records raise ValueError naming the file and
    line, or are counted in ``counts.skipped`` with ``skip_bad``."""
    builder = SUFFIX_BUILDERS[path.suffix.lower()]
    if builder == "text":
        return _paragraphs(path, skip_bad, counts)
    if builder == "json":
        return _json_records(path, text_field, skip_bad, counts)
    return _parquet_rows(path, text_field, counts)


def load_texts(files: list[Path], text_field: str, skip_bad: bool = False) -> tuple[list[str], int]:
    """All documents of the files as one list (small inputs, tests); returns (texts, skipped
    records). Preparation streams the same documents instead."""
    counts = _Counts()
    texts = [t for path in files for t in file_documents(path, text_field, skip_bad, counts)]
    return texts, counts.skipped


# --------------------------------------------------------------------------------------------
# Tokenising, in parallel, in order
# --------------------------------------------------------------------------------------------


def token_dtype(tokenizer) -> np.dtype:
    return index_dtype(tokenizer.vocab_size)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
    return tokenizer.eos_token_id


def token_ids(texts: list[str], tokenizer, eos: int, dtype: np.dtype) -> np.ndarray:
    """The documents' tokens, each followed by EOS, as one flat array."""
    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    count = sum(map(len, docs)) + len(docs)
    return np.fromiter(chain.from_iterable(chain(d, (eos,)) for d in docs), dtype=dtype, count=count)


_WORKER: dict = {}


def _init_worker(tokenizer, eos: int, dtype: str) -> None:
    # One process per core already: the tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, eos=eos, dtype=np.dtype(dtype))


def _worker_token_ids(texts: list[str]) -> np.ndarray:
    return token_ids(texts, _WORKER["tokenizer"], _WORKER["eos"], _WORKER["dtype"])


def _batches(docs: Iterable[str], counts: _Counts) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for d in docs:
        batch.append(d)
        size += len(d)
        counts.documents += 1
        if size >= TOKENIZE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_stream(batches: Iterator[list[str]], tokenizer, num_proc: int) -> Iterator[np.ndarray]:
    """Token arrays of the document batches, in order. With ``num_proc`` > 1 and a corpus of at
    least POOL_MIN_BATCHES batches, forked worker processes tokenise; at most 2 x num_proc
    batches are in flight, so memory stays bounded whatever the corpus size."""
    eos, dtype = _eos(tokenizer), token_dtype(tokenizer)
    head = list(islice(batches, POOL_MIN_BATCHES))
    if num_proc <= 1 or len(head) < POOL_MIN_BATCHES:
        for b in chain(head, batches):
            yield token_ids(b, tokenizer, eos, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork, as `datasets.map(num_proc=...)` does on Linux: workers start at once, inherit the
    # tokenizer, and never re-import the caller's __main__ (spawn and forkserver would, so a script
    # without an `if __name__ == "__main__"` guard would run again in every worker). The workers
    # only run the tokenizer and numpy, never the parent's torch/gloo/NCCL state; the tokenizers
    # library turns its own thread pool off in a forked child. A worker that dies (e.g. OOM-killed)
    # breaks the pool with an error instead of hanging it.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer, eos, dtype.str))
    pending: deque = deque()
    try:
        for b in chain(head, batches):
            pending.append(pool.submit(_worker_token_ids, b))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pack(texts: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Tokenise in this process, join documents with EOS, cut into [N, L] blocks in memory (the
    remainder is dropped). For small inputs; preparation streams the same tokens to disk."""
    ids = token_ids(texts, tokenizer, _eos(tokenizer), token_dtype(tokenizer)) if texts else np.empty(0, np.uint32)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


# --------------------------------------------------------------------------------------------
# Packing to disk
# --------------------------------------------------------------------------------------------


class BlockFile:
    """An [N, L] .npy file written block by block: the header is rewritten with the final N at the
    end (numpy pads headers so the first dimension can grow in place; numpy/lib/format.py,
    GROWTH_AXIS_MAX_DIGITS). Tokens past the last whole block are dropped."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype, max_blocks: int = 0) -> None:
        self.seq_len, self.dtype, self.max_blocks = seq_len, dtype, max_blocks
        self.blocks = 0
        self._carry = np.empty(0, dtype)
        self._f = open(path, "wb")
        self._write_header()
        self._data_start = self._f.tell()

    def _write_header(self) -> None:
        descr = np.lib.format.dtype_to_descr(self.dtype)
        header = {"descr": descr, "fortran_order": False, "shape": (self.blocks, self.seq_len)}
        np.lib.format.write_array_header_1_0(self._f, header)

    @property
    def full(self) -> bool:
        return 0 < self.max_blocks <= self.blocks

    def add(self, ids: np.ndarray) -> bool:
        """Append tokens; True once max_blocks blocks are written."""
        buf = np.concatenate([self._carry, ids]) if len(self._carry) else ids
        n = len(buf) // self.seq_len
        if self.max_blocks:
            n = min(n, self.max_blocks - self.blocks)
        self._f.write(buf[: n * self.seq_len].tobytes())
        self._carry = buf[n * self.seq_len :].copy()
        self.blocks += n
        return self.full

    def close(self) -> int:
        """Write the final header, flush to disk, close; returns N."""
        self._f.seek(0)
        self._write_header()
        assert self._f.tell() == self._data_start, "the .npy header changed size"
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self.blocks

    def abort(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------------------------
# Sources and the cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One cache entry's input: local files, or a hub dataset (with ``max_blocks``: only the
    first blocks of it, read as a stream)."""

    field: str
    """The config field it comes from, for messages (data.train, data.eval, data.hub_dataset)."""
    files: tuple[Path, ...] = ()
    hub: str = ""
    max_blocks: int = 0
    """Stop after this many blocks (0: all)."""

    @property
    def shown(self) -> str:
        return self.hub or ", ".join(map(str, self.files))

    def size(self) -> int | None:
        """Bytes to read, for the progress bar (unknown for a hub dataset)."""
        return sum(f.stat().st_size for f in self.files) if self.files else None

    def key(self, tokenizer, cfg: DataConfig) -> str:
        """Files (path, size, mtime) or hub name/split/stream length, tokenizer, seq_len, text
        field and skip_bad_records: what the blocks depend on."""
        if self.files:
            return _fingerprint(list(self.files), tokenizer, cfg.seq_len, cfg.text_field, cfg.skip_bad_records)
        src = [self.hub, cfg.hub_split, cfg.streaming, self.max_blocks]
        tok = _fingerprint([], tokenizer, cfg.seq_len, cfg.text_field, False)
        return hashlib.sha256(json.dumps(src).encode() + tok.encode()).hexdigest()[:20]

    def prepared(self, tokenizer, cfg: DataConfig, cache_dir: Path) -> bool:
        return cache_paths(cache_dir, self.key(tokenizer, cfg))[0].is_file()

    def documents(self, cfg: DataConfig, counts: _Counts) -> Iterator[str]:
        if self.files:
            for path in self.files:
                yield from file_documents(path, cfg.text_field, cfg.skip_bad_records, counts)
        else:
            yield from _hub_documents(cfg, counts)
        counts.flush()


def files_source(patterns: list[str], field: str) -> Source:
    return Source(field, tuple(expand_paths(patterns, field)))


def hub_source(cfg: DataConfig, max_blocks: int) -> Source:
    return Source("data.hub_dataset", hub=cfg.hub_dataset, max_blocks=max_blocks if cfg.streaming else 0)


def _hub_documents(cfg: DataConfig, counts: _Counts) -> Iterator[str]:
    from datasets import load_dataset

    name, _, subset = cfg.hub_dataset.partition(":")
    try:
        ds = load_dataset(name, subset or None, split=cfg.hub_split, streaming=cfg.streaming)
    except Exception as e:  # the hub raises many types; the user needs the name and the cause
        raise ValueError(
            f"data.hub_dataset ({cfg.hub_dataset!r}, split {cfg.hub_split!r}) could not be loaded: {e}. "
            "Check the name and split, or use local files in data.train"
        ) from None
    for record in ds:
        text = record.get(cfg.text_field)
        if not isinstance(text, str):
            raise ValueError(
                f"data.hub_dataset ({cfg.hub_dataset!r}) has no string field data.text_field "
                f"({cfg.text_field!r}); its fields: {sorted(record)}"
            )
        counts.read(len(text))
        if text.strip():
            yield text


def _fingerprint(files: list[Path], tokenizer, seq_len: int, text_field: str, skip_bad: bool) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps([len(vocab), tokenizer.eos_token_id, seq_len, text_field, skip_bad]).encode())
    h.update(hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).digest())
    return h.hexdigest()[:20]


def num_proc(cfg: DataConfig) -> int:
    """data.num_proc, with 0 resolved to min(8, CPU count)."""
    return cfg.num_proc or min(8, os.cpu_count() or 1)


def write_blocks(source: Source, tokenizer, cfg: DataConfig, path: Path, progress: bool = False) -> dict:
    """Stream ``source`` through the tokenizer into an [N, L] .npy file at ``path``; returns its
    facts (documents, skipped records, blocks, tokens)."""
    from tqdm import tqdm

    interval = 0.1 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not every 0.1 s
    with tqdm(total=source.size(), unit="B", unit_scale=True, desc=f"prepare {source.field}",
              disable=not progress, mininterval=interval) as bar:  # fmt: skip
        counts = _Counts(bar)
        out = BlockFile(path, cfg.seq_len, token_dtype(tokenizer), source.max_blocks)
        stream = token_stream(_batches(source.documents(cfg, counts), counts), tokenizer, num_proc(cfg))
        try:
            for ids in stream:
                if out.add(ids):
                    break
        except BaseException:
            out.abort()
            raise
        finally:
            stream.close()  # stops the worker pool now, also after an early stop at max_blocks
        blocks = out.close()
    if counts.documents == 0:
        raise ValueError(f"{source.field} ({source.shown}) holds no text; give non-empty files")
    if blocks == 0:
        raise ValueError(
            f"{source.field} ({source.shown}) has fewer tokens than one block of data.seq_len ({cfg.seq_len}); "
            "add text or lower data.seq_len"
        )
    return {"documents": counts.documents, "skipped": counts.skipped, "blocks": blocks, "tokens": blocks * cfg.seq_len}


def _tmp_tag() -> str:
    """Unique per process, also across nodes that share the cache folder (pids repeat across hosts)."""
    return f"tmp-{socket.gethostname()}-{os.getpid()}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{_tmp_tag()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    """(blocks .npy, facts .json, failure marker) of one cache entry."""
    return cache_dir / f"blocks_{key}.npy", cache_dir / f"blocks_{key}.json", cache_dir / f"blocks_{key}.failed"


def prepare(source: Source, tokenizer, cfg: DataConfig, cache_dir: Path, progress: bool = False) -> dict:
    """Prepare one cache entry unless it exists: the blocks are written to a temporary file and
    renamed into place when complete (a reader never sees a partial file). A failure leaves a
    marker with the error for ranks that wait on this entry. Returns the entry's facts."""
    path, facts_path, failed = cache_paths(cache_dir, source.key(tokenizer, cfg))
    if path.is_file():
        return {**_facts(path), "cached": True}
    cache_dir.mkdir(parents=True, exist_ok=True)
    failed.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.stem}.{_tmp_tag()}.npy")
    t0 = time.perf_counter()
    if progress:
        log.info("preparing %s (%s) with %d process(es) into %s", source.field, source.shown, num_proc(cfg), path)
    try:
        facts = {**write_blocks(source, tokenizer, cfg, tmp, progress), "source": source.shown}
        _atomic_write(facts_path, json.dumps(facts, indent=2))
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # keep the original error if the folder is not writable
            _atomic_write(failed, str(e) or type(e).__name__)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if progress:
        log.info("prepared %d blocks of %d tokens in %.1f s", facts["blocks"], cfg.seq_len, time.perf_counter() - t0)
    return {**facts, "cached": False}


def _facts(path: Path) -> dict:
    facts_path = path.with_suffix(".json")
    if facts_path.is_file():
        return json.loads(facts_path.read_text())
    skipped = path.with_suffix(".skipped")  # caches written before the .json facts file
    return {"skipped": int(skipped.read_text()) if skipped.is_file() else 0}


def _process_start() -> float:
    import psutil  # a deepspeed dependency, so every rank has it

    return psutil.Process().create_time()


def wait_for(source: Source, tokenizer, cfg: DataConfig, cache_dir: Path) -> None:
    """Wait, without any collective, until another process has prepared the entry: poll for the
    finished file, or for a failure marker written after this process started (an older one is
    from an earlier run)."""
    path, _, failed = cache_paths(cache_dir, source.key(tokenizer, cfg))
    started = _process_start() - 1.0  # file times and process start times round differently
    while not path.is_file():
        if failed.is_file() and failed.stat().st_mtime >= started:
            raise ValueError(f"preparing {source.field} failed on the preparing rank: {failed.read_text()}")
        time.sleep(POLL_SECONDS)


def open_blocks(
    source: Source, tokenizer, cfg: DataConfig, cache_dir: Path, mode: str = "write", progress: bool = False
) -> tuple[np.ndarray, dict]:
    """The packed blocks [N, L] of ``source``, memory-mapped from the cache, and their facts.

    When the entry is missing: ``mode="write"`` prepares it, ``"wait"`` waits for another process
    to prepare it (see :func:`wait_for`), ``"memory"`` prepares into a temporary folder and reads
    the blocks into memory (nothing is cached).
    """
    path, _, _ = cache_paths(cache_dir, source.key(tokenizer, cfg))
    info: dict = {"cached": path.is_file()}
    if source.files:
        info["files"] = [str(f) for f in source.files]
    if not info["cached"]:
        if mode == "write":
            prepare(source, tokenizer, cfg, cache_dir, progress)
        elif mode == "wait":
            wait_for(source, tokenizer, cfg, cache_dir)
        elif mode == "memory":
            with tempfile.TemporaryDirectory(prefix="ds_upcycle_blocks_") as tmp:
                facts = prepare(source, tokenizer, cfg, Path(tmp))
                blocks = np.load(cache_paths(Path(tmp), source.key(tokenizer, cfg))[0])
            return blocks, {**info, "skipped": facts["skipped"], "blocks": len(blocks)}
        else:
            raise ValueError(f"mode ({mode!r}) must be 'write', 'wait' or 'memory'")
    facts = _facts(path)
    blocks = np.load(path, mmap_mode="r")
    return blocks, {**info, "skipped": facts.get("skipped", 0), "blocks": len(blocks), "cache_file": str(path)}


def load_blocks(
    patterns: list[str], field: str, tokenizer, cfg: DataConfig, cache_dir: Path, is_writer: bool = True,
    wait: bool = False,
) -> tuple[np.ndarray, dict]:  # fmt: skip
    """Packed blocks [N, L] of local files, memory-mapped from the cache (prepared first when the
    files, tokenizer or settings changed). Not the writer: wait for the writer (``wait``), or
    prepare into memory without caching. Returns (blocks, info)."""
    mode = "write" if is_writer else "wait" if wait else "memory"
    return open_blocks(files_source(patterns, field), tokenizer, cfg, cache_dir, mode)


def load_hub_blocks(
    cfg: DataConfig, tokenizer, max_blocks: int, cache_dir: Path, is_writer: bool = True, wait: bool = False
) -> tuple[np.ndarray, dict]:
    """Packed blocks from ``data.hub_dataset`` ("name" or "name:subset"), wherever the hub is
    reachable (a local dataset folder works too). With ``data.streaming`` only the first
    ``max_blocks`` blocks are read, so a corpus larger than the disk is fine."""
    mode = "write" if is_writer else "wait" if wait else "memory"
    blocks, info = open_blocks(hub_source(cfg, max_blocks), tokenizer, cfg, cache_dir, mode)
    return blocks, {"hub_dataset": cfg.hub_dataset, "split": cfg.hub_split, "streaming": cfg.streaming, **info}


# --------------------------------------------------------------------------------------------
# A run's data: what `ds-upcycle prepare-data`, `ds-upcycle train` and every rank agree on
# --------------------------------------------------------------------------------------------


def run_cache_dir(cfg: RunConfig) -> Path:
    """data.cache_dir, or <output_dir>/../.cache/tokens."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.train.output_dir).parent / ".cache" / "tokens"


def run_sources(cfg: RunConfig, global_batch: int) -> tuple[Source, Source | None]:
    """(training source, held-out source or None when held-out blocks are split off the training
    ones). A streamed hub dataset is read for as many blocks as the run's batches plus the
    held-out share, so it never wraps."""
    if cfg.data.train:
        train = files_source(cfg.data.train, "data.train")
    else:
        needed = math.ceil(cfg.train.steps * global_batch / (1 - cfg.data.eval_fraction)) + 1
        train = hub_source(cfg.data, needed)
    return train, files_source(cfg.data.eval, "data.eval") if cfg.data.eval else None


def prepare_run(cfg: RunConfig, global_batch: int, tokenizer=None, progress: bool = True) -> list[dict]:
    """Prepare every cache entry of a run that is missing (the front ends run this before any rank
    starts, so ranks normally just open the cache). Returns each entry's facts."""
    from ds_upcycle.loading import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg.model.path)
    cache_dir = run_cache_dir(cfg)
    return [
        {"field": s.field, **prepare(s, tokenizer, cfg.data, cache_dir, progress)}
        for s in run_sources(cfg, global_batch)
        if s is not None
    ]


def prepare_main(argv: list[str] | None = None) -> int:
    """ds-upcycle prepare-data CONFIG [--num-gpus N | --hostfile F] [--section.key=value ...]"""
    import argparse

    from ds_upcycle.config import load_run_config, resolve_config
    from ds_upcycle.launch import add_world_arguments, world_size
    from ds_upcycle.preflight import validate

    p = argparse.ArgumentParser(
        prog="ds-upcycle prepare-data",
        description="Tokenise a run's data into its cache before training: documents are read as a stream, "
        "tokenised by data.num_proc processes, joined with EOS, packed into data.seq_len blocks and written to "
        "an .npy file that every rank then reads memory-mapped. `ds-upcycle train` does the same before it "
        "starts the launcher; run this first to prepare a large corpus once, on its own. Takes the same CONFIG, "
        "world size and --section.key=value overrides as `ds-upcycle train`, checked the same way (the world size "
        "also sets how much of a streamed hub dataset is read).",
        epilog="example: ds-upcycle prepare-data gpu_zero2_bf16_ep8 --num-gpus 8 --data.num_proc=16",
    )
    p.add_argument("config", help="a run config file, or a shipped config's name")
    add_world_arguments(p)
    args, overrides = p.parse_known_args(argv)
    cfg = load_run_config(resolve_config(args.config), overrides)
    derived = validate(cfg, world_size(args.num_gpus, args.hostfile))
    t0 = time.perf_counter()
    entries = prepare_run(cfg, derived.global_batch)
    for e in entries:
        state = "cached already" if e["cached"] else "prepared"
        skipped = f", {e['skipped']} malformed records skipped" if e.get("skipped") else ""
        print(f"{e['field']}: {e.get('blocks', '?')} blocks of {cfg.data.seq_len} tokens, {state}{skipped}")
    print(f"cache: {run_cache_dir(cfg)} ({time.perf_counter() - t0:.1f} s)")
    return 0


# --------------------------------------------------------------------------------------------
# Reading blocks during training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSampler:
    """Deterministic, disjoint per-rank micro-batches as a pure function of the step.

    The stream of block indices is epoch after epoch of seeded permutations. Global micro-batch
    slot ``(step * accum + a) * world + rank`` takes the next ``micro`` indices of that stream,
    so within each global batch the ranks read disjoint blocks, and resuming at step s reads
    exactly what an uninterrupted run would. An epoch's permutation is computed once and kept
    (the current and the previous epoch), so an index costs O(1) amortised instead of a
    permutation of all N blocks.
    """

    num_blocks: int
    micro: int
    accum: int
    world: int
    rank: int
    seed: int
    _perms: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def indices(self, step: int, accum_index: int) -> list[int]:
        slot = (step * self.accum + accum_index) * self.world + self.rank
        start = slot * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, self.num_blocks)
            out.append(int(self._epoch_order(epoch)[offset]))
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the blocks in ``epoch`` (computed on every call)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = self._perms.get(epoch)
        if order is None:
            if len(self._perms) >= 2:  # a step can straddle two epochs; older ones are not read again
                del self._perms[min(self._perms)]
            order = self._perms[epoch] = self.permutation(epoch).astype(index_dtype(self.num_blocks))
        return order


def index_dtype(n: int) -> np.dtype:
    """uint32 for values below 2**32 (half the memory of numpy's int64), else int64."""
    return np.dtype(np.uint32 if n < 2**32 else np.int64)


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
