"""Batch sources: what a run reads each step, and the held-out blocks it is scored on.

- `batches`: rows of blocks packed in memory, every row once per epoch, a new seeded order each epoch.
- `InMemoryBatches` / `StreamedBatches`: each process's share of a run's global batches from a given step on (a
  resumed run starts at its checkpoint's step): packed in memory (built-ins, local files), or streamed as the
  corpus is read, in bounded memory (hub datasets; `data.streaming`), each process reading only its own streams
  (deepen.stream) and saving their positions in every checkpoint.
- `heldout_blocks`: the first blocks of a corpus's held-out split, packed or streamed (the same blocks).
- `HELDOUT_SETS`: each rung's named held-out set, on which every notebook, lab and the rung's reproduction score
  its models — one base, one perplexity, everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deepen.data import is_hub_name, load_corpus, pack
from deepen.stream import SHUFFLE_BLOCKS, BlockStream, PartReader, stream_count


def batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """`steps` batches of rows of `blocks` (n_blocks, seq): every row once per epoch, a new order each epoch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(blocks), generator=generator)])
        yield blocks[order[:batch_size]]  # (batch, seq)
        order = order[batch_size:]


_PACKED: dict[tuple, torch.Tensor] = {}


def packed(corpus, split: str, tokenizer, seq_len: int, max_tokens: int | None, text_column: str = "text"):
    """Packed blocks (n, seq_len) of a corpus split, the first `max_tokens`; kept in memory for the next run in
    this process (a notebook comparing methods packs each corpus once). Keyed by the corpus spec, so a local
    file edited between runs is read again only in a new process."""
    key = (repr(corpus), split, tokenizer.name_or_path, len(tokenizer), seq_len, max_tokens, text_column)
    if key not in _PACKED:
        _PACKED[key] = pack(load_corpus(corpus, split, text_column=text_column), tokenizer, seq_len, max_tokens)
    return _PACKED[key]


def streams(data, corpus: str) -> bool:
    """Whether a run with data config `data` (deepen.config.DataConfig) streams `corpus`: data.streaming if set,
    else only when the corpus is a hub dataset (or a mixture with one); built-ins and local files are packed."""
    return data.streaming if data.streaming is not None else is_hub_name(corpus)


def heldout_blocks(corpus, tokenizer, seq_len: int, n_blocks: int | None = None, *, text_column: str = "text",
                   streaming: bool = False) -> torch.Tensor:
    """The first `n_blocks` packed blocks (n, seq_len) of a corpus's held-out split (all of it when None), in
    memory; streaming reads only as much of the split as they need (the same blocks: an unshuffled stream packs
    as `pack` does)."""
    if not streaming:
        return packed(corpus, "heldout", tokenizer, seq_len, None if n_blocks is None else n_blocks * seq_len,
                      text_column)
    blocks = list(itertools.islice(BlockStream(corpus, "heldout", tokenizer, seq_len, passes=1,
                                               text_column=text_column), n_blocks))
    if not blocks:
        raise ValueError(f"the held-out split does not fill one block of seq_len={seq_len}")
    return torch.stack(blocks)


@dataclass(frozen=True)
class HeldoutSet:
    """A rung's held-out set: the first `n_blocks` blocks of `seq_len` tokens of the held-out split of its general
    corpus (forgetting) and of its domain corpus (gain). The rung's run configs evaluate on exactly these blocks
    (data.seq_len, train.eval_batches × train.global_batch = n_blocks; tests/test_reproduce.py holds them to it)."""

    name: str
    general: str
    domain: str
    seq_len: int
    n_blocks: int
    samples: int = 64  # general prompts the base continues (and questions it answers), for drift (deepen.forgetting)
    sample_tokens: int = 128  # tokens the base writes for each

    def blocks(self, role: str, tokenizer) -> torch.Tensor:
        """The blocks (n_blocks, seq_len) of the `role` corpus ("general" or "domain"), tokenised by `tokenizer`."""
        if role not in ("general", "domain"):
            raise ValueError(f"role={role!r} is not one of general, domain")
        return heldout_blocks(getattr(self, role), tokenizer, self.seq_len, self.n_blocks)

    def __str__(self) -> str:
        return (f"{self.name}: the first {self.n_blocks} blocks of {self.seq_len} tokens of the held-out split of "
                f"{self.general!r} (general) and {self.domain!r} (domain)")


HELDOUT_SETS = {
    "tiny": HeldoutSet("the tiny held-out set", general="general", domain="code", seq_len=128, n_blocks=32,
                       samples=32, sample_tokens=64),
    "smol": HeldoutSet("the SmolLM2 held-out set", general="wiki", domain="code", seq_len=256, n_blocks=64),
}


class ResumedByStep:
    """A batch source whose position is its step alone (it holds all its data and orders it by seed): nothing to
    save in a checkpoint beyond the step."""

    def position(self) -> dict:
        return {}

    def state(self) -> tuple[dict, dict]:
        return {}, {}

    def restore(self, state: dict, tensors: dict) -> None:
        pass


class InMemoryBatches(ResumedByStep):
    """Global batches of the training blocks packed in memory: `batches`, every block once per epoch."""

    def __init__(self, blocks: torch.Tensor, global_batch: int, steps: int, seed: int):
        self.blocks, self.global_batch, self.steps, self.seed = blocks, global_batch, steps, seed

    def local_batches(self, start: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, int]]:
        """(this process's rows (global_batch / world, seq_len), the global batch's tokens) for steps start+1, ..."""
        per = self.global_batch // world
        stream = batches(self.blocks, self.global_batch, self.steps, self.seed)
        for _ in range(start):
            next(stream)  # the data position of the checkpoint
        for batch in stream:
            yield batch[rank * per:(rank + 1) * per], batch.numel()


class StreamedBatches:
    """Each process's share of the global batches of a corpus streamed as it is read (deepen.stream): S streams
    (S = gcd(global_batch, 16)), row j of every global batch from stream j mod S, this process reading only the
    streams s with s mod world = rank — so W processes (W dividing S) read disjoint documents and together the
    global batches one process would. Each stream shuffles in its own seeded window and makes a new pass when its
    share ends. `state()` is every stream's position, saved in each checkpoint, so a resume reads nothing again
    (but the rows before its position in the file each part was in). Each part's first document is read at once:
    a bad corpus fails before the model loads."""

    def __init__(self, spec, tokenizer, data, global_batch: int, seed: int, rank: int = 0, world: int = 1, say=print):
        self.count = stream_count(global_batch)
        if self.count % world:
            raise ValueError(f"a streamed corpus is read as {self.count} streams (from train.global_batch="
                             f"{global_batch}), which {world} processes cannot share: run a process count that "
                             f"divides {self.count}")
        self.spec, self.global_batch, self.rank, self.world, self.say = spec, global_batch, rank, world, say
        window = max(1, SHUFFLE_BLOCKS // self.count)
        max_tokens = None if data.max_tokens is None else max(1, data.max_tokens // self.count)
        self.streams = {s: BlockStream(spec, "train", tokenizer, data.seq_len, stream=s, streams=self.count, seed=seed,
                                       window=window, max_tokens=max_tokens, text_column=data.text_column,
                                       on_pass=lambda k, documents, tokens, s=s: self._passed(s, k, documents, tokens))
                        for s in range(self.count) if s % world == rank}
        # fails early on a bad corpus, reading one document of each part in every stream — on every process, its
        # own streams or not, so all of them stop alike (none waits in a collective for one that stopped)
        parts = [(reader.part, reader.column) for reader in next(iter(self.streams.values())).readers]
        for s in range(self.count):
            for part, column in parts:
                if PartReader(part, "train", s, self.count, seed, False, column).next_text() is None:
                    raise ValueError(f"corpus {part.name!r} has too few documents for {self.count} streams (none in "
                                     f"stream {s} of its train split); add documents, or lower train.global_batch "
                                     f"(streams = gcd(global_batch, 16))")
        self.seq_len = data.seq_len

    def _passed(self, stream: int, k: int, documents: int, tokens: int) -> None:
        if stream == 0:
            self.say(f"{self.spec}: pass {k + 1} over the training stream done (stream 0 of {self.count}: "
                     f"{documents:,} documents, {tokens:,} tokens); starting pass {k + 2}")

    def local_batches(self, start: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, int]]:
        """(this process's rows, the global batch's tokens), step after step from where the streams stand."""
        mine = [j for j in range(self.global_batch) if (j % self.count) % self.world == self.rank]
        while True:
            yield torch.stack([next(self.streams[j % self.count]) for j in mine]), self.global_batch * self.seq_len

    def position(self) -> dict:
        """Passes over the corpus read to their end so far (by this process's first stream)."""
        return {"data_passes": min(stream.done_passes for stream in self.streams.values())}

    def state(self) -> tuple[dict, dict]:
        """(JSON, tensors) of this process's streams: what a checkpoint saves per process."""
        states, tensors = {}, {}
        for s, stream in self.streams.items():
            states[str(s)], own = stream.state()
            tensors.update({f"stream/{s}/{k}": v for k, v in own.items()})
        return {"streams": states, "count": self.count}, tensors

    def restore(self, state: dict, tensors: dict) -> None:
        if state.get("count") != self.count:
            raise ValueError(f"the checkpoint's data was read as {state.get('count')} streams, this run's as "
                             f"{self.count}: resume with the same train.global_batch")
        for s, stream in self.streams.items():
            stream.restore(state["streams"][str(s)], {k: tensors[f"stream/{s}/{k}"] for k in ("blocks", "pending")})


def training_batches(data, train, tokenizer, say=print, rank: int = 0, world: int = 1):
    """The run's training batches (deepen.config DataConfig and TrainConfig): streamed when `streams` says so,
    else the first tokens the steps need (or data.max_tokens) packed in memory."""
    if streams(data, data.domain):
        return StreamedBatches(data.domain, tokenizer, data, train.global_batch, train.seed, rank, world, say)
    tokens = data.max_tokens or train.steps * train.global_batch * data.seq_len
    return InMemoryBatches(packed(data.domain, "train", tokenizer, data.seq_len, tokens, data.text_column),
                           train.global_batch, train.steps, train.seed)
