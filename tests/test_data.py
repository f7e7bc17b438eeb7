"""Data: real files (read like `datasets` reads them), packing with EOS, parallel preparation into
a memory-mapped cache, waiting for another rank's preparation, and the step-indexed sampler."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from ds_upcycle.config import DataConfig
from ds_upcycle.data import BlockSampler, eval_batches, expand_paths, load_blocks, load_texts, pack, split_train_eval


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from ds_upcycle.tools.tiny import write_tiny_setup

    return write_tiny_setup(tmp_path_factory.mktemp("tiny"), n_docs=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_setup):
    return PreTrainedTokenizerFast.from_pretrained(tiny_setup["model"])


def test_txt_jsonl_parquet_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc line\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "third"}) + "\n" + json.dumps({"body": "fourth"}) + "\n")
    pq.write_table(pa.table({"body": ["fifth", "sixth"]}), tmp_path / "c.parquet")
    files = expand_paths(
        [str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")], "data.train"
    )
    texts, skipped = load_texts(files, "body")
    assert [t.strip() for t in texts] == ["first doc line", "second doc", "third", "fourth", "fifth", "sixth"]
    assert skipped == 0


def test_pack_joins_documents_with_eos(tokenizer):
    blocks = pack(["aaa bbb", "ccc"], tokenizer, seq_len=4)
    flat = blocks.reshape(-1).tolist()
    ids = tokenizer("aaa bbb", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert (
        flat == (ids + tokenizer("ccc", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[: len(flat)]
    )
    assert blocks.shape[1] == 4


def test_blocks_are_cached_and_reused(tiny_setup, tokenizer, tmp_path):
    cfg = DataConfig(seq_len=32)
    a, info_a = load_blocks([tiny_setup["train"]], "data.train", tokenizer, cfg, tmp_path)
    b, info_b = load_blocks([tiny_setup["train"]], "data.train", tokenizer, cfg, tmp_path)
    assert not info_a["cached"] and info_b["cached"]
    assert np.array_equal(a, b)
    c, info_c = load_blocks([tiny_setup["train"]], "data.train", tokenizer, DataConfig(seq_len=16), tmp_path)
    assert not info_c["cached"] and c.shape[1] == 16  # a different seq_len is a different cache entry


def test_sampler_is_disjoint_per_global_batch_and_covers_each_epoch():
    world, micro, accum, n = 2, 3, 2, 24
    samplers = [BlockSampler(n, micro, accum, world, r, seed=7) for r in range(world)]
    per_epoch_steps = n // (micro * accum * world)
    seen = []
    for step in range(per_epoch_steps):
        batch = [i for s in samplers for a in range(accum) for i in s.indices(step, a)]
        assert len(set(batch)) == len(batch)  # ranks never share a block within a global batch
        seen += batch
    assert sorted(seen) == list(range(n))  # one epoch = every block exactly once
    assert samplers[0].indices(5, 1) == BlockSampler(n, micro, accum, world, 0, seed=7).indices(5, 1)  # pure


def test_split_and_eval_batches():
    blocks = np.arange(40).reshape(20, 2)
    train, held = split_train_eval(blocks, 0.2)
    assert len(train) == 16 and len(held) == 4 and held[0, 0] == 32
    r0, r1 = (eval_batches(held, 1, 2, r, count=5) for r in (0, 1))
    assert len(r0) == len(r1) == 2  # equal counts on every rank
    assert not set(map(int, np.concatenate(r0).ravel())) & set(map(int, np.concatenate(r1).ravel()))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: [str(d / "none*.txt")], r"data.train \('.*none\*.txt'\) matches no file"),
        (lambda d: [str(d)], r"is a folder; give files or a glob"),
        (lambda d: [str((d / "x.csv").write_text("a") and d / "x.csv")], r"unsupported suffix '.csv'"),
    ],
)
def test_bad_paths(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        expand_paths(setup(tmp_path), "data.train")


def test_bad_records_name_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2 is not valid JSON"):
        load_texts([bad_json], "text")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"body": "x"}\n')
    with pytest.raises(
        ValueError, match=r"missing.jsonl line 1 has no string field data.text_field \('text'\); its keys: \['body'\]"
    ):
        load_texts([missing], "text")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin.txt line 2 is not valid UTF-8"):
        load_texts([latin], "text")
    texts, skipped = load_texts([bad_json, latin], "text", skip_bad=True)
    assert skipped == 2 and "ok" in texts


def test_empty_and_too_short_data(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"data.train \(.*empty.txt\) holds no text"):
        load_blocks([str(empty)], "data.train", tokenizer, DataConfig(), tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(ValueError, match=r"fewer tokens than one block of data.seq_len \(256\)"):
        load_blocks([str(short)], "data.train", tokenizer, DataConfig(), tmp_path)


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_by_name_with_streaming(tmp_path, tokenizer, streaming):
    """The hub path (`load_dataset(name, streaming=...)`), fed a local dataset folder: no hub here."""
    from ds_upcycle.data import load_hub_blocks
    from ds_upcycle.tools.tiny import synthetic_corpus

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "part.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_corpus(200)))
    cfg = DataConfig(hub_dataset=str(folder), streaming=streaming, seq_len=16)
    blocks, info = load_hub_blocks(cfg, tokenizer, max_blocks=10, cache_dir=tmp_path / "cache")
    assert blocks.shape[1] == 16 and not info["cached"]
    assert (len(blocks) == 10) if streaming else (len(blocks) > 10)  # streaming reads only what it needs
    with pytest.raises(ValueError, match=r"data.hub_dataset \('.*nope'.*could not be loaded"):
        load_hub_blocks(DataConfig(hub_dataset=str(tmp_path / "nope")), tokenizer, 10, tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# Preparation: same documents as `datasets`, parallel == serial, the cache, waiting ranks
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
TRICKY_TXT = "first para\nsame para\r\n\r\nsecond\n\n\n\nthird  \n \n\nfourth\rstill fourth\n\n  \n"


def _datasets_texts(path: Path, text_field: str = "text") -> list[str]:
    """What the earlier `datasets`-based reader returned for a clean file (the reference)."""
    from datasets import load_dataset

    if path.suffix == ".txt":
        ds = load_dataset("text", data_files=str(path), split="train", sample_by="paragraph")
        return [t for t in ds["text"] if t.strip()]
    return [t for t in load_dataset("json", data_files=str(path), split="train")[text_field] if t.strip()]


def _corpus_files(tmp_path: Path, n_docs: int) -> tuple[Path, Path]:
    from ds_upcycle.tools.tiny import synthetic_corpus

    docs = synthetic_corpus(n_docs, seed=3)
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text(TRICKY_TXT + "\n\n".join(docs[::2]) + "\n")
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1::2]) + "\n" + json.dumps({"text": " "}))
    return txt, jsonl


def test_txt_and_jsonl_are_read_like_datasets(tmp_path, monkeypatch):
    """Paragraph splitting (CRLF, runs of blank lines), across the reader's chunk boundaries."""
    from ds_upcycle import data

    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 7)  # a chunk boundary every few lines
    txt, jsonl = _corpus_files(tmp_path, 30)
    for f in (txt, jsonl):
        assert load_texts([f], "text")[0] == _datasets_texts(f)
    assert load_texts([txt], "text")[0][:4] == [
        "first para\nsame para",
        "second",
        "third  \n ",
        "fourth\nstill fourth",
    ]


def test_parallel_preparation_equals_serial_and_is_memory_mapped(tiny_setup, tokenizer, tmp_path, monkeypatch):
    from ds_upcycle import data

    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 2000)  # many tasks for the worker pool
    files = [tiny_setup["train"], tiny_setup["eval"]]
    serial, info1 = load_blocks(files, "data.train", tokenizer, DataConfig(seq_len=16, num_proc=1), tmp_path / "c1")
    parallel, info2 = load_blocks(files, "data.train", tokenizer, DataConfig(seq_len=16, num_proc=2), tmp_path / "c2")
    assert isinstance(serial, np.memmap) and isinstance(parallel, np.memmap)
    assert np.array_equal(serial, parallel)
    expected = pack(load_texts([Path(f) for f in files], "text")[0], tokenizer, 16)
    assert np.array_equal(parallel, expected) and len(expected) > 100
    assert info2["blocks"] == len(expected) and not info2["cached"]
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == sorted(
        [Path(info2["cache_file"]).name, Path(info2["cache_file"]).with_suffix(".json").name]
    )  # no temporary file left behind


def test_skipped_counts_survive_the_cache(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(20)) + "{broken\n[1]\n")
    cfg = DataConfig(seq_len=16, skip_bad_records=True)
    _, first = load_blocks([str(bad)], "data.train", tokenizer, cfg, tmp_path / "cache")
    _, again = load_blocks([str(bad)], "data.train", tokenizer, cfg, tmp_path / "cache")
    assert (first["cached"], first["skipped"]) == (False, 2)
    assert (again["cached"], again["skipped"]) == (True, 2)


def test_failed_preparation_leaves_no_cache_and_stops_waiting_ranks(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"bad.jsonl line 2 is not valid JSON"):
        load_blocks([str(bad)], "data.train", tokenizer, DataConfig(), cache)
    assert [p.suffix for p in cache.iterdir()] == [".failed"]  # no blocks, no temporary file
    with pytest.raises(ValueError, match=r"preparing data.train failed on the preparing rank: .*line 2 is not valid"):
        load_blocks([str(bad)], "data.train", tokenizer, DataConfig(), cache, is_writer=False, wait=True)


def test_waiting_rank_reads_what_the_writer_prepares(tiny_setup, tokenizer, tmp_path):
    """A waiting rank polls the file system (no collective) and ignores an earlier run's failure marker."""
    from ds_upcycle.data import cache_paths, files_source

    cfg, cache = DataConfig(seq_len=16), tmp_path / "cache"
    cache.mkdir()
    key = files_source([tiny_setup["train"]], "data.train").key(tokenizer, cfg)
    stale = cache_paths(cache, key)[2]
    stale.write_text("an earlier run's error")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    written = {}

    def writer():
        time.sleep(2)
        written["blocks"], _ = load_blocks([tiny_setup["train"]], "data.train", tokenizer, cfg, cache)

    t = threading.Thread(target=writer)
    t.start()
    waited, info = load_blocks([tiny_setup["train"]], "data.train", tokenizer, cfg, cache, is_writer=False, wait=True)
    t.join()
    assert np.array_equal(waited, written["blocks"]) and isinstance(waited, np.memmap)
    assert not stale.exists()  # the writer removed it before preparing


_BLOCK_DATASETS = """
import importlib.abc, sys

class _NoDatasets(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "datasets" or name.startswith("datasets."):
            raise ModuleNotFoundError("No module named 'datasets' (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoDatasets())
"""


@pytest.mark.slow
def test_txt_and_jsonl_need_no_datasets(tiny_setup, tokenizer, tmp_path):
    """`ds-upcycle prepare-data` (2 worker processes) in a child where `import datasets` fails: a
    sitecustomize blocks it in every process started with that environment. The blocks equal those
    made from `datasets`' own reading of the same files."""
    from ds_upcycle.data import cache_paths, files_source

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_BLOCK_DATASETS)
    txt, jsonl = _corpus_files(tmp_path, 300)
    cache = tmp_path / "cache"
    child = (
        "import sys\nimport ds_upcycle.data as d\nd.TOKENIZE_BATCH_CHARS = 4000  # several tasks for the 2 workers\n"
        "from ds_upcycle.cli import main\ncode = main(sys.argv[1:])\n"
        "try:\n    import datasets\nexcept ImportError:\n    pass\nelse:\n    sys.exit('datasets was importable')\n"
        "assert 'datasets' not in sys.modules\nsys.exit(code)\n"
    )
    args = ["prepare-data", "cpu_debug_zero2_ep2", "--num-gpus", "2", f"--model.path={tiny_setup['model']}",
            f'--data.train=["{txt}", "{jsonl}"]', f'--data.eval=["{tiny_setup["eval"]}"]', "--data.seq_len=16",
            "--data.num_proc=2", f"--data.cache_dir={cache}", f"--train.output_dir={tmp_path / 'run'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-c", child, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data.train: " in proc.stdout and "prepared" in proc.stdout
    cfg = DataConfig(seq_len=16)
    train = np.load(cache_paths(cache, files_source([str(txt), str(jsonl)], "data.train").key(tokenizer, cfg))[0])
    expected = pack(_datasets_texts(txt) + _datasets_texts(jsonl), tokenizer, 16)
    assert np.array_equal(train, expected)
    assert cache_paths(cache, files_source([tiny_setup["eval"]], "data.eval").key(tokenizer, cfg))[0].is_file()


def test_sampler_reads_each_epoch_order_once_and_stays_pure():
    """Indices equal the definition (position p of the stream -> permutation(p // N)[p % N]) across
    epoch boundaries, with at most two epoch orders kept."""
    n, micro, accum, world = 10, 3, 2, 2
    s = BlockSampler(n, micro, accum, world, 1, seed=11)
    for step in range(12):  # ~14 epochs of 10 blocks
        for a in range(accum):
            start = ((step * accum + a) * world + 1) * micro
            want = [int(s.permutation(p // n)[p % n]) for p in range(start, start + micro)]
            assert s.indices(step, a) == want
            assert len(s._perms) <= 2
    assert BlockSampler(n, micro, accum, world, 1, seed=11).indices(7, 1) == s.indices(7, 1)  # resume at step 7


@pytest.mark.slow
def test_a_long_preparation_in_the_ranks_does_not_trip_the_collective_timeout(tiny_setup, tokenizer, tmp_path):
    """Ranks that find no cache (a bare `deepspeed` launch, 2 ranks): rank 0 prepares a corpus whose
    serial tokenisation alone takes longer than train.timeout_s, while rank 1 waits on the file
    system instead of in a barrier; the run completes."""
    from conftest import DEBUG_CONFIG, debug_overrides, launch

    from ds_upcycle.tools.tiny import synthetic_corpus

    timeout_s, docs = 8, synthetic_corpus(2000, seed=5)
    corpus = tmp_path / "big.txt"
    with open(corpus, "w") as f:
        for i in range(64):  # 19 MB: ~13 s to tokenise serially here (one core; 1.7 x the timeout)
            f.write("\n\n".join(docs[i % 7 :] + docs[: i % 7]) + "\n\n")
    t0 = time.perf_counter()
    serial = pack(load_texts([corpus], "text")[0], tokenizer, 64)  # what rank 0 alone did before
    serial_s = time.perf_counter() - t0
    assert serial_s > timeout_s, f"the corpus must take longer than the timeout to tokenise serially ({serial_s:.1f} s)"
    out = tmp_path / "run"
    overrides = debug_overrides(
        tiny_setup, out, **{"data.train": [str(corpus)], "data.cache_dir": str(tmp_path / "cache"),
                            "data.seq_len": 64, "data.num_proc": 2, "train.timeout_s": timeout_s,
                            "train.steps": 2, "train.save_every": 0, "log.wandb": "disabled"},
    )  # fmt: skip
    proc = launch("ds_upcycle.train", [str(DEBUG_CONFIG), *overrides], nprocs=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["data"]["blocks"] == len(serial) and not summary["data"]["cached"]
    assert "local rank 0 prepares it while the other ranks wait for the file" in proc.stdout
