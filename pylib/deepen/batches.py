"""Batch sources: what a run reads each step, and the held-out blocks it is scored on.

- `batches`: rows of blocks packed in memory, every row once per epoch, a new seeded order each epoch.
- `InMemoryBatches` / `StreamedBatches`: a run's global batches, the same on every process, from a given step on
  (a resumed run starts at its checkpoint's step): packed in memory (built-ins, local files), or streamed as the
  corpus is read, in bounded memory (hub datasets; `data.streaming`).
- `heldout_blocks`: the first blocks of a corpus's held-out split, packed or streamed (the same blocks).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from deepen.data import STREAM_SHUFFLE_BLOCKS, is_hub_name, load_corpus, pack, stream_blocks


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


def packed(corpus: str, split: str, tokenizer, seq_len: int, max_tokens: int | None, text_column: str = "text"):
    """Packed blocks (n, seq_len) of a corpus split, the first `max_tokens`; kept in memory for the next run in
    this process (a notebook comparing methods packs each corpus once). Keyed by the corpus name, so a local
    file edited between runs is read again only in a new process."""
    key = (corpus, split, tokenizer.name_or_path, len(tokenizer), seq_len, max_tokens, text_column)
    if key not in _PACKED:
        _PACKED[key] = pack(load_corpus(corpus, split, text_column=text_column), tokenizer, seq_len, max_tokens)
    return _PACKED[key]


def streams(data, corpus: str) -> bool:
    """Whether a run with data config `data` (deepen.config.DataConfig) streams `corpus`: data.streaming if set,
    else only when the corpus is a hub dataset (or a mixture with one); built-ins and local files are packed."""
    return data.streaming if data.streaming is not None else is_hub_name(corpus)


def heldout_blocks(corpus: str, tokenizer, seq_len: int, n_blocks: int | None = None, *, text_column: str = "text",
                   streaming: bool = False) -> torch.Tensor:
    """The first `n_blocks` packed blocks (n, seq_len) of a corpus's held-out split (all of it when None), in
    memory; streaming reads only as much of the split as they need (the same blocks: an unshuffled stream packs
    as `pack` does)."""
    if not streaming:
        return packed(corpus, "heldout", tokenizer, seq_len, None if n_blocks is None else n_blocks * seq_len,
                      text_column)
    blocks = list(itertools.islice(stream_blocks(corpus, "heldout", tokenizer, seq_len, passes=1,
                                                 text_column=text_column), n_blocks))
    if not blocks:
        raise ValueError(f"the held-out split does not fill one block of seq_len={seq_len}")
    return torch.stack(blocks)


class InMemoryBatches:
    """Global batches of the training blocks packed in memory: `batches`, every block once per epoch."""

    def __init__(self, blocks: torch.Tensor, global_batch: int, steps: int, seed: int):
        self.blocks, self.global_batch, self.steps, self.seed = blocks, global_batch, steps, seed

    def global_batches(self, start: int) -> Iterator[torch.Tensor]:
        """(global_batch, seq_len) for steps start+1, start+2, ...: the same on every process."""
        stream = batches(self.blocks, self.global_batch, self.steps, self.seed)
        for _ in range(start):
            next(stream)  # the data position of the checkpoint
        return stream

    def position(self) -> dict:
        return {}

    @staticmethod
    def tokens(batch: torch.Tensor) -> int:
        return batch.numel()


class StreamedBatches:
    """Global batches of a corpus streamed as it is read (`deepen.data.stream_blocks`): bounded memory, shuffled
    in a seeded buffer, a new pass over the corpus whenever it ends. The stream is deterministic for a seed, so
    resuming at step `start` reads and drops its first start × global_batch blocks: the same position, at the cost
    of reading those again. The first block is read at once, so a bad corpus fails before the model loads."""

    def __init__(self, corpus: str, tokenizer, data, global_batch: int, seed: int, say=print):
        self.corpus, self.global_batch, self.passes, self.say = corpus, global_batch, 0, say
        self.blocks = stream_blocks(corpus, "train", tokenizer, data.seq_len, text_column=data.text_column,
                                    seed=seed, shuffle_buffer=STREAM_SHUFFLE_BLOCKS, max_tokens=data.max_tokens,
                                    on_pass=self._passed)
        self.first = next(self.blocks)

    def _passed(self, k: int, documents: int, tokens: int) -> None:
        self.passes = k + 1
        self.say(f"{self.corpus}: pass {k + 1} over the training stream done ({documents:,} documents, "
                 f"{tokens:,} tokens); starting pass {k + 2}")

    def global_batches(self, start: int) -> Iterator[torch.Tensor]:
        blocks = itertools.chain([self.first], self.blocks)
        for _ in itertools.islice(blocks, start * self.global_batch):
            pass  # the data position of the checkpoint, read again
        while True:
            yield torch.stack(list(itertools.islice(blocks, self.global_batch)))

    def position(self) -> dict:
        return {"data_passes": self.passes}  # passes over the corpus read to their end so far

    @staticmethod
    def tokens(batch: torch.Tensor) -> int:
        return batch.numel()


def training_batches(data, train, tokenizer, say=print):
    """The run's training batches (deepen.config DataConfig and TrainConfig): streamed when `streams` says so,
    else the first tokens the steps need (or data.max_tokens) packed in memory."""
    if streams(data, data.domain):
        return StreamedBatches(data.domain, tokenizer, data, train.global_batch, train.seed, say)
    tokens = data.max_tokens or train.steps * train.global_batch * data.seq_len
    return InMemoryBatches(packed(data.domain, "train", tokenizer, data.seq_len, tokens, data.text_column),
                           train.global_batch, train.steps, train.seed)
