"""Streamed corpora (deepen.stream, data.streaming in a run): the same documents, split and tokens as the in-memory
path; S streams of disjoint documents that together are the corpus; a deterministic shuffle; runs that train and
resume exactly from the saved stream positions, twice in a row. Offline: local JSONL files stand for a hub dataset
(data.streaming=true streams them through `datasets` the same way)."""

import itertools
import json
import random

import datasets
import pytest
import torch

import deepen.batches
import deepen.stream
from deepen.batches import streams
from deepen.config import DataConfig, load_config
from deepen.data import SPLITS, load_corpus, pack, tiny_tokenizer
from deepen.rundir import METRICS
from deepen.stream import BlockStream, PartReader
from deepen.data import corpus_parts
from deepen.train import train

WORDS = "the of a model block layer token def return import x = 1 + 2 ( ) : loss grows deeper".split()


def write_jsonl(path, n: int, seed: int, start: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(start, start + n):  # some empty and blank texts, which both paths drop
            text = "" if i % 37 == 0 else "  " if i % 41 == 0 else " ".join(rng.choices(WORDS, k=rng.randint(1, 80)))
            f.write(json.dumps({"text": f"{i} {text}" if text.strip() else text, "n": i}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 300, 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A corpus of 6 JSONL shards, as hub datasets come."""
    folder = tmp_path_factory.mktemp("shards")
    for k in range(6):
        write_jsonl(folder / f"part-{k:02d}.jsonl", 80, k, start=1000 * k)
    return str(folder)


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    """4 shards of 600 documents: more than one batch of texts a stream tokenises at once, so that a checkpoint
    falls mid-file."""
    folder = tmp_path_factory.mktemp("big-shards")
    for k in range(4):
        write_jsonl(folder / f"part-{k:02d}.jsonl", 600, k, start=10_000 * k)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(4096)


def first(blocks, n: int) -> torch.Tensor:
    return torch.stack(list(itertools.islice(blocks, n)))


def documents(spec, split="train", stream=0, streams=1, shuffle=False, seed=0) -> list[str]:
    reader = PartReader(corpus_parts(spec)[0], split, stream, streams, seed, shuffle, "text")
    out = []
    while (text := reader.next_text()) is not None:
        out.append(text)
    return out


def test_streamed_blocks_are_the_packed_blocks(corpus, shards, tokenizer, tmp_path):
    """Unshuffled, one stream holds load_corpus's documents in its order, and its blocks are pack's (pack drops the
    tail of the last block; the stream carries it into its next pass)."""
    other = write_jsonl(tmp_path / "other.jsonl", 60, 1)
    for name in (corpus, shards, f"{corpus}:3,{other}:1"):  # a mixture streams by the same rule as mix_corpora
        for split in SPLITS:
            packed_blocks = pack(load_corpus(name, split), tokenizer, 32)
            assert torch.equal(first(BlockStream(name, split, tokenizer, 32), len(packed_blocks)), packed_blocks)
    assert documents(shards) == load_corpus(shards)["text"]
    capped = pack(load_corpus(corpus), tokenizer, 32, max_tokens=1000)
    assert torch.equal(first(BlockStream(corpus, "train", tokenizer, 32, max_tokens=1000, passes=1), 99), capped)
    # a built-in streams too, when asked: its own ids decide its split, as in load_corpus
    assert torch.equal(first(BlockStream("math", "heldout", tokenizer, 32), 20),
                       pack(load_corpus("math", "heldout"), tokenizer, 32, max_tokens=20 * 32))


def test_held_out_and_train_documents_are_disjoint(corpus):
    texts = [json.loads(line)["text"] for line in open(corpus)]
    every = [t for t in texts if t.strip()]
    for shuffle in (False, True):
        train_docs, heldout_docs = documents(corpus, "train", shuffle=shuffle), documents(corpus, "heldout", shuffle=shuffle)
        assert heldout_docs and not set(train_docs) & set(heldout_docs)
        assert sorted(train_docs + heldout_docs) == sorted(every)  # every document, once


@pytest.mark.parametrize("count", [2, 4, 8])
def test_streams_split_the_documents_between_them(corpus, shards, count):
    """S streams read disjoint documents whose union is what one stream reads: by file when there are at least S
    files (each stream opens only its own), by row otherwise."""
    for name in (corpus, shards):
        whole = documents(name)
        parts = [documents(name, stream=s, streams=count) for s in range(count)]
        assert sum(len(p) for p in parts) == len(whole) and sorted(sum(parts, [])) == sorted(whole)
        assert all(p for p in parts)
    readers = [PartReader(corpus_parts(shards)[0], "train", s, 4, 0, False, "text") for s in range(4)]
    assert sorted(f for r in readers for f in r.files) == sorted(str(p) for p in __import__("pathlib").Path(shards).iterdir())
    assert all(len(r.files) in (1, 2) and not r.by_row for r in readers)  # 6 files over 4 streams: its own files


def test_the_shuffle_is_bounded_and_deterministic(shards, tokenizer):
    in_order = first(BlockStream(shards, "train", tokenizer, 32, passes=1), 100_000)  # one pass, in order
    n = 2 * len(in_order) + 100  # blocks of three passes

    def run(seed):
        return first(BlockStream(shards, "train", tokenizer, 32, window=64, seed=seed), n)

    passes = []
    a = first(BlockStream(shards, "train", tokenizer, 32, window=64, seed=1,
                          on_pass=lambda k, docs, tokens: passes.append((k, docs))), n)
    assert torch.equal(a, run(1)) and not torch.equal(a, run(2))  # the same for a seed, another for another seed
    assert [k for k, _ in passes] == [0, 1]  # blocks forever: a new pass whenever the stream ends
    assert passes[0][1] == len(load_corpus(shards))  # a pass is the whole train split, then the stream starts over
    # shuffled, one pass holds the same tokens as the unshuffled pass, give or take the tail carried between blocks
    one_pass = first(BlockStream(shards, "train", tokenizer, 32, window=64, seed=1, passes=1), 100_000)
    assert abs(len(one_pass) - len(in_order)) <= 1
    assert (one_pass.flatten().bincount(minlength=4096) - in_order.flatten().bincount(minlength=4096)).abs().sum() < 2 * 32


def test_a_stream_restored_from_its_state_goes_on_exactly(big_shards, tokenizer, monkeypatch):
    a = BlockStream(big_shards, "train", tokenizer, 32, window=16, seed=3, stream=1, streams=4)
    first(a, 300)
    state, tensors = json.loads(json.dumps(a.state()[0])), a.state()[1]  # what a checkpoint holds
    assert 0 < state["readers"][0]["row"] < 600 and len(tensors["pending"]) < 16 * 200  # mid-file, few tokens waiting
    rest = first(a, 1200)  # past the end of the stream's file: the next pass too
    opened = []
    rows = deepen.stream._rows
    monkeypatch.setattr(deepen.stream, "_rows", lambda part, fmt, file, skip, sample_by: (
        opened.append(skip), rows(part, fmt, file, skip, sample_by))[1])
    b = BlockStream(big_shards, "train", tokenizer, 32, window=16, seed=3, stream=1, streams=4)
    b.restore(state, tensors)
    assert torch.equal(first(b, 1200), rest)
    assert opened[0] == state["readers"][0]["row"] and opened[1:] == [0]  # on from its row; then the next pass


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


def test_a_streamed_run_trains_and_resumes_exactly_twice(base, big_shards, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(deepen.batches, "SHUFFLE_BLOCKS", 8)  # windows of 2 blocks per stream: resumes fall mid-file
    streamed = ("data.streaming=true", f"data.domain={big_shards}")
    train(config(base, tmp_path / "whole", *streamed), progress=False)

    def stop_at(step):
        def callback(record, model):
            if record["step"] == step:
                raise Stop
        return callback

    with pytest.raises(Stop):  # killed after step 3, logged but not checkpointed (the last: step 2)
        train(config(base, tmp_path / "cut", *streamed), progress=False, callback=stop_at(3))
    with pytest.raises(Stop):  # resumed from the saved stream positions, killed again after step 5 (last: 4)
        train(config(base, tmp_path / "cut", *streamed), progress=False, callback=stop_at(5))
    train(config(base, tmp_path / "cut", *streamed), progress=False)  # and again, to the end

    whole, cut = records(tmp_path / "whole"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(7))
    assert [(r.get("loss"), r.get("ppl_domain"), r.get("ppl_general")) for r in cut] == \
        [(r.get("loss"), r.get("ppl_domain"), r.get("ppl_general")) for r in whole]  # exactly: the same floats
    assert whole[-1]["loss"] < whole[1]["loss"] and whole[-1]["data_passes"] == 0  # a stream: passes counted

    # the held-out blocks are the in-memory path's: step 0's perplexity is the same as an unstreamed run's
    in_memory = records(train(config(base, tmp_path / "mem", f"data.domain={big_shards}", "train.steps=1"),
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
        m.setattr(deepen.batches, "StreamedBatches", refuse)
        out = train(config(base, tmp_path / "run", "train.steps=1", "data.max_tokens=4096"), progress=False)
    assert "data_passes" not in records(out.parent)[1]

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # a hub corpus streams: offline, it fails clearly
    with pytest.raises(RuntimeError, match="data.domain='EleutherAI/proof-pile-2'.*hub dataset.*HF_HUB_OFFLINE"):
        train(config(base, tmp_path / "hub", "data.domain=EleutherAI/proof-pile-2"), progress=False)
    assert not (tmp_path / "hub").exists()


@pytest.mark.slow
def test_two_processes_read_their_own_streams_and_train_as_one(base, big_shards, tmp_path):
    """torchrun with 2 CPU processes (gloo) on a streamed corpus: each reads and packs only its own streams (2 of the
    4), the global batches are one process's, so the losses are the one-process run's to float tolerance; killed and
    resumed, the 2-process run goes on exactly."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {base}\ngrow: {{method: llama-pro, groups: 2}}\n"
                    f"data: {{domain: {big_shards}, streaming: true, seq_len: 32}}\n"
                    "train: {steps: 4, global_batch: 4, micro_batch: 1, lr: 1.0e-2, eval_every: 4, eval_batches: 1, "
                    "save_every: 2}\n")
    one = records(train(load_config(path, [f"out={tmp_path / 'one'}"]), progress=False).parent)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "deepen", "train", "--config", str(path),
                    f"out={tmp_path / 'two'}"], check=True, capture_output=True, env=env)
    two = records(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]
    assert [r["loss"] for r in two[1:]] == pytest.approx([r["loss"] for r in one[1:]], rel=1e-5)
    assert two[-1]["ppl_domain"] == pytest.approx(one[-1]["ppl_domain"], rel=1e-5)
    saved = sorted(p.name for p in (tmp_path / "two").rglob("rank-*.json"))
    assert not saved  # the finished run removed its checkpoints


def test_a_corpus_too_small_for_its_streams_stops_every_process_alike(tmp_path, tokenizer):
    """A corpus too small for 16 streams, whose empty streams all belong to process 1 of 2: each process says so
    before any work (process 0 going on would wait forever for process 1, which stopped)."""

    def empty(path):
        return {s for s in range(16) if not documents(path, stream=s, streams=16)}

    small = next(path for n in range(8, 60) if (gaps := empty(path := write_jsonl(tmp_path / f"{n}.jsonl", n, 0)))
                 and all(s % 2 for s in gaps))
    data = DataConfig(domain=small, seq_len=16)
    for rank in (0, 1):
        with pytest.raises(ValueError, match="too few documents for 16 streams"):
            deepen.batches.StreamedBatches(small, tokenizer, data, 16, 0, rank=rank, world=2)
    assert deepen.batches.StreamedBatches(small, tokenizer, data, 2, 0, rank=1, world=2).count == 2
