"""Benchmark: resuming a streamed corpus costs the same early and late in a run.

A local corpus of JSONL shards (made here, standing for a hub dataset's files) is read as deepen.stream's streams by
`deepen.batches.StreamedBatches`, as `deepen train` reads it. The batches are drawn to an early and to a late step;
each time the streams' state (what a checkpoint saves) is taken, a fresh StreamedBatches is restored from it and
its next batch drawn. Timed: that resume (restore + first batch), at both positions, and beside it what a resume
without saved positions costs — reading the stream again up to the late step. The next batch after a resume is
checked to be the one the uninterrupted stream gives.

Prints
    BENCH stream_resume_late_over_early <ratio> x           goal <= 1.5
    BENCH stream_reread_over_resume_late <ratio> x          how much a saved position saves, late in a run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from deepen.batches import StreamedBatches  # noqa: E402
from deepen.config import DataConfig  # noqa: E402
from deepen.data import tiny_tokenizer  # noqa: E402

WORDS = ("the of a model block layer token grows deeper returns import value loss gradient frozen new copy zero "
         "residual stream attention norm").split()


def make_corpus(folder: Path, shards: int, documents: int) -> None:
    rng = random.Random(0)
    for k in range(shards):
        with open(folder / f"part-{k:03d}.jsonl", "w") as f:
            for i in range(documents):
                f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(50, 400)))}) + "\n")


def resume(corpus: str, tokenizer, data: DataConfig, global_batch: int, state) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    batches = StreamedBatches(corpus, tokenizer, data, global_batch, seed=0, say=lambda _: None)
    batches.restore(*state)
    batch, _ = next(batches.local_batches(0))
    return time.perf_counter() - start, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=32, help="JSONL files (default 32)")
    parser.add_argument("--documents", type=int, default=2000, help="documents per file (default 2000)")
    parser.add_argument("--early", type=int, default=5, help="the early step (default 5)")
    parser.add_argument("--late", type=int, default=400, help="the late step (default 400: past the first files)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a small corpus and steps: checks the script end to end")
    args = parser.parse_args()
    if args.smoke:
        args.shards, args.documents, args.early, args.late, args.repeats = 16, 40, 1, 4, 1
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer(4096)
    global_batch, seq_len = 16, 256
    with tempfile.TemporaryDirectory() as tmp:
        make_corpus(Path(tmp), args.shards, args.documents)
        data = DataConfig(domain=tmp, streaming=True, seq_len=seq_len)
        source = StreamedBatches(tmp, tokenizer, data, global_batch, seed=0, say=lambda _: None)
        stream = source.local_batches(0)
        states, following, step = {}, {}, 0
        began = time.perf_counter()
        while step < args.late:
            next(stream)
            step += 1
            if step in (args.early, args.late):
                states[step] = source.state()  # what a checkpoint at this step saves
                reread = time.perf_counter() - began  # reading the stream to here from its start
                following[step] = next(stream)[0]
                step += 1
        times = {}
        for step in (args.early, args.late):
            runs = []
            for _ in range(args.repeats):
                seconds, batch = resume(tmp, tokenizer, data, global_batch, states[step])
                assert torch.equal(batch, following[step]), "a resumed stream gave another batch"
                runs.append(seconds)
            times[step] = statistics.median(runs)
        tokens = args.late * global_batch * seq_len
        print(f"{args.shards} shards x {args.documents} documents; {16} streams, global batch {global_batch} x "
              f"{seq_len}; resume at step {args.early}: {times[args.early]:.2f} s, at step {args.late} "
              f"({tokens:,} tokens in): {times[args.late]:.2f} s; reading the stream again to step {args.late}: "
              f"{reread:.2f} s")
        print(f"BENCH stream_resume_late_over_early {times[args.late] / times[args.early]:.2f} x")
        print(f"BENCH stream_reread_over_resume_late {reread / times[args.late]:.2f} x")


if __name__ == "__main__":
    main()
