"""Streamed corpora (deepen.data.stream_documents / stream_blocks, data.streaming in a run): the same documents,
split and tokens as the in-memory path, a deterministic shuffle, and runs that train and resume exactly. Offline:
a local JSONL file stands for a hub dataset (data.streaming=true streams it through `datasets` the same way)."""

import itertools
import json
import random

import datasets
import pytest
import torch

import deepen.batches
from deepen.config import DataConfig, load_config
from deepen.data import SPLITS, load_corpus, pack, stream_blocks, stream_documents, tiny_tokenizer
from deepen.batches import streams
from deepen.rundir import METRICS
from deepen.train import train

WORDS = "the of a model block layer token def return import x = 1 + 2 ( ) : loss grows deeper".split()


def write_jsonl(path, n: int, seed: int):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):  # some empty and blank texts, which both paths drop
            text = "" if i % 37 == 0 else "  " if i % 41 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 80)))
            f.write(json.dumps({"text": text, "n": i}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 300, 0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(4096)


def first(blocks, n: int) -> torch.Tensor:
    return torch.stack(list(itertools.islice(blocks, n)))


def test_streamed_blocks_are_the_packed_blocks(corpus, tokenizer, tmp_path):
    """Unshuffled, a stream holds load_corpus's documents in its order, and its blocks are pack's (pack drops the
    tail of the last block; the stream carries it into its next pass)."""
    other = write_jsonl(tmp_path / "other.jsonl", 60, 1)
    for name in (corpus, f"{corpus}:3,{other}:1"):  # a mixture streams by the same rule as mix_corpora
        for split in SPLITS:
            assert list(stream_documents(name, split)) == load_corpus(name, split)["text"]
            packed_blocks = pack(load_corpus(name, split), tokenizer, 32)
            assert torch.equal(first(stream_blocks(name, split, tokenizer, 32), len(packed_blocks)), packed_blocks)
    capped = pack(load_corpus(corpus), tokenizer, 32, max_tokens=1000)
    assert torch.equal(first(stream_blocks(corpus, "train", tokenizer, 32, max_tokens=1000, passes=1), 99), capped)
    # a built-in streams too, when asked: its own ids decide its split, as in load_corpus
    assert torch.equal(first(stream_blocks("math", "heldout", tokenizer, 32), 20),
                       pack(load_corpus("math", "heldout"), tokenizer, 32, max_tokens=20 * 32))


def test_held_out_and_train_documents_are_disjoint(corpus):
    texts = [json.loads(line)["text"] for line in open(corpus)]
    documents = [t for t in texts if t.strip()]
    for shuffle in (False, True):
        train_docs = list(stream_documents(corpus, "train", shuffle=shuffle, seed=3))
        heldout_docs = list(stream_documents(corpus, "heldout", shuffle=shuffle, seed=3))
        assert heldout_docs and not set(train_docs) & set(heldout_docs)
        assert sorted(train_docs + heldout_docs) == sorted(documents)  # every document, once
    assert list(stream_documents(corpus, shuffle=True, seed=3)) != list(stream_documents(corpus))


def test_the_shuffle_is_bounded_and_deterministic(corpus, tokenizer):
    in_order = first(stream_blocks(corpus, "train", tokenizer, 32, passes=1), 100_000)  # one pass, in order
    n = 2 * len(in_order) + 100  # blocks of three passes

    def run(seed):
        return first(stream_blocks(corpus, "train", tokenizer, 32, shuffle_buffer=64, seed=seed), n)

    passes = []
    a = first(stream_blocks(corpus, "train", tokenizer, 32, shuffle_buffer=64, seed=1,
                            on_pass=lambda k, docs, tokens: passes.append((k, docs))), n)
    assert torch.equal(a, run(1)) and not torch.equal(a, run(2))  # the same for a seed, another for another seed
    assert [k for k, _ in passes] == [0, 1]  # blocks forever: a new pass whenever the stream ends
    assert passes[0][1] == len(load_corpus(corpus))  # a pass is the whole train split, then the stream starts over
    # shuffled, one pass holds the same tokens as the unshuffled pass, give or take the tail carried between blocks
    one_pass = first(stream_blocks(corpus, "train", tokenizer, 32, shuffle_buffer=64, seed=1, passes=1), 100_000)
    assert abs(len(one_pass) - len(in_order)) <= 1
    assert (one_pass.flatten().bincount(minlength=4096) - in_order.flatten().bincount(minlength=4096)).abs().sum() < 2 * 32


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def base(small_llama_path):
    return small_llama_path


def config(base, out, *overrides):
    return load_config(None, [f"model={base}", "grow={method: llama-pro, groups: 2}", "data.seq_len=32",
                              "train.steps=6", "train.global_batch=4", "train.micro_batch=2", "train.lr=1e-2",
                              "train.warmup=0.25", "train.eval_every=3", "train.eval_batches=1",
                              "train.save_every=2", f"out={out}", *overrides])


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


class Stop(Exception):
    pass


def test_a_streamed_run_trains_and_resumes_exactly(base, corpus, tokenizer, tmp_path):
    streamed = ("data.streaming=true", f"data.domain={corpus}")
    train(config(base, tmp_path / "whole", *streamed), progress=False)

    def stop_at_3(record, model):
        if record["step"] == 3:
            raise Stop

    with pytest.raises(Stop):  # killed after step 3, logged but not checkpointed (the last: step 2)
        train(config(base, tmp_path / "cut", *streamed), progress=False, callback=stop_at_3)
    train(config(base, tmp_path / "cut", *streamed), progress=False)  # resumes: reads the stream up to step 2 again

    whole, cut = records(tmp_path / "whole"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(7))
    assert [(r.get("loss"), r.get("ppl_domain"), r.get("ppl_general")) for r in cut] == \
        [(r.get("loss"), r.get("ppl_domain"), r.get("ppl_general")) for r in whole]  # exactly: the same floats
    assert whole[-1]["loss"] < whole[1]["loss"] and whole[-1]["data_passes"] >= 1  # the buffer filled over passes

    # the held-out blocks are the in-memory path's: step 0's perplexity is the same as an unstreamed run's
    in_memory = records(train(config(base, tmp_path / "mem", f"data.domain={corpus}", "train.steps=1"),
                              progress=False).parent)
    assert in_memory[0] == whole[0] and "data_passes" not in in_memory[1]


def test_which_corpora_stream(base, tmp_path, monkeypatch):
    assert not streams(DataConfig(), "code") and not streams(DataConfig(), "math")  # built-ins: in memory
    assert streams(DataConfig(), "EleutherAI/proof-pile-2") and streams(DataConfig(), "EleutherAI/proof-pile-2:default")
    assert streams(DataConfig(), "code:0.4,EleutherAI/proof-pile-2:0.6") and not streams(DataConfig(), "code:1,math:1")
    assert streams(DataConfig(streaming=True), "code") and not streams(DataConfig(streaming=False), "user/data")
    assert not streams(DataConfig(), str(tmp_path))  # a local folder, even one named like user/data

    def refuse(*args, **kwargs):
        raise AssertionError("a built-in corpus streamed by default")

    with monkeypatch.context() as m:  # the default for built-ins: packed in memory, never streamed
        m.setattr(deepen.batches, "stream_blocks", refuse)
        out = train(config(base, tmp_path / "run", "train.steps=1", "data.max_tokens=4096"), progress=False)
    assert "data_passes" not in records(out.parent)[1]

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # a hub corpus streams: offline, it fails clearly
    with pytest.raises(RuntimeError, match="data.domain='EleutherAI/proof-pile-2'.*hub dataset.*HF_HUB_OFFLINE"):
        train(config(base, tmp_path / "hub", "data.domain=EleutherAI/proof-pile-2"), progress=False)
    assert not (tmp_path / "hub").exists()
