"""Data: real files through `datasets`, packing with EOS, the cache, and the step-indexed sampler."""

import json

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
