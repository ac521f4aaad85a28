"""Corpora too large for memory, streamed: documents read file by file, split, tokenised, packed into blocks and
shuffled as they go, in bounded memory — and every position saved, so a resumed run goes on from where it stopped
without reading again what came before.

A corpus (or mixture) is read as S *streams*: stream s takes its own files (files s, s + S, ...; when there are
fewer files than streams, every S-th row of each file), so the streams' documents are disjoint and together the
whole corpus. Row j of every global batch comes from stream j mod S; a run on W processes (W dividing S) gives each
process the streams s with s mod W = its rank, so it reads, tokenises and packs only its own share, and the global
batch is the same whatever W. Each stream:

    documents (a mixture: the next from the part furthest below its share of characters, `deepen.data.mix_corpora`'s
    rule) -> BlockCutter -> blocks -> a window of blocks permuted by a seeded shuffle -> out

and its state — for each part the pass, the file and the rows read in it; the tokens not yet in a block; the rest
of the current window — is what a checkpoint saves (JSON, and the window's blocks as a tensor). Resuming re-opens
each part's current file and skips the rows read in it: at most one file is read again.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
import datasets
import torch

from deepen.config import Corpus
from deepen.data import (BUILTINS, BlockCutter, corpus_parts, file_format, hub_offline_error, is_heldout,
                         load_corpus, local_files, names_hub_dataset, unknown_corpus_error)

MAX_STREAMS = 16  # streams per corpus: any process count dividing it (1, 2, 4, 8, 16) reads the same global batches
SHUFFLE_BLOCKS = 1_024  # blocks in the shuffle windows of all streams together (1024 x 4096 int64 tokens = 32 MB)


def stream_count(global_batch: int) -> int:
    """S: the streams a run's corpus is read as, from its global batch alone (never from the process count)."""
    return math.gcd(global_batch, MAX_STREAMS)


# ---------------------------------------------------------------------------------------------- one part's files


def part_files(part: Corpus) -> tuple[str, list[str]]:
    """(format, files) of one corpus part: "builtin" ([its name]); local files ("json", "parquet" or "text"); a hub
    dataset's data files for its split ("json", "parquet", "text", "csv"), or ("dataset", [its id]) when the hub
    cannot name its files (then it is read as one stream, without file-level positions)."""
    name = part.name
    if name in BUILTINS:
        return "builtin", [name]
    if files := local_files(name):
        return file_format(files, name), files
    if not names_hub_dataset(name):
        raise unknown_corpus_error(name)
    if datasets.config.HF_HUB_OFFLINE:
        raise hub_offline_error(name)
    builder = datasets.load_dataset_builder(name, part.config, data_dir=part.data_dir, revision=part.revision)
    files = (builder.config.data_files or {}).get(part.split)
    if builder.name in ("json", "parquet", "text", "csv") and files:
        return builder.name, list(files)
    return "dataset", [name]


def _rows(part: Corpus, fmt: str, file: str, skip: int, sample_by: str) -> Iterator[dict]:
    """The rows of one file from row `skip` on, as dicts."""
    if fmt == "dataset":
        rows = datasets.load_dataset(part.name, part.config, data_dir=part.data_dir, split=part.split, streaming=True,
                                     revision=part.revision)
    elif fmt == "text":
        rows = datasets.load_dataset("text", data_files=[file], sample_by=sample_by, split="train", streaming=True)
    else:
        rows = datasets.load_dataset(fmt, data_files=[file], split="train", streaming=True)
    return iter(rows.skip(skip) if skip else rows)


class PartReader:
    """The documents of one part, for stream `stream` of `streams`, in one split, pass after pass (each pass its own
    seeded order of the stream's files when shuffled): `next_text()`, and `state`/`restore` for a checkpoint."""

    def __init__(self, part: Corpus, split: str, stream: int, streams: int, seed: int, shuffle: bool,
                 text_column: str):
        self.part, self.split, self.stream, self.streams, self.seed, self.shuffle = part, split, stream, streams, seed, shuffle
        self.column = part.text_column or text_column
        self.fmt, files = part_files(part)
        self.sample_by = "document" if len(files) > 1 else "paragraph"  # as deepen.data's in-memory reading
        if self.fmt == "builtin":  # small: split already, by its own ids
            docs = load_corpus(part.name, split, heldout_fraction=part.heldout_fraction)["text"]
            self.docs, self.files, self.by_row = docs[stream::streams], [part.name], False
        else:
            self.docs = None
            self.by_row = len(files) < streams  # too few files: every stream reads each, keeping every S-th row
            self.files = files if self.by_row else files[stream::streams]
        self.passes, self.file, self.row = 0, 0, 0
        self._rows: Iterator | None = None

    def _order(self) -> list[str]:
        order = list(self.files)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.stream}-{self.passes}").shuffle(order)
        return order

    def next_text(self) -> str | None:
        """The next document of this pass, or None when the pass has ended (the next call starts the next pass)."""
        while True:
            if self.docs is not None:
                if self.row >= len(self.docs):
                    return self._end_pass()
                self.row += 1
                text = self.docs[self.row - 1]
                if text and text.strip():
                    return text
                continue
            if self.file >= len(self.files):
                return self._end_pass()
            if self._rows is None:
                self._rows = _rows(self.part, self.fmt, self._order()[self.file], self.row, self.sample_by)
            row = next(self._rows, None)
            if row is None:
                self.file, self.row, self._rows = self.file + 1, 0, None
                continue
            self.row += 1
            if self.by_row and (self.row - 1) % self.streams != self.stream:
                continue
            if self.column not in row:
                raise ValueError(f"{self.part.name} has no column {self.column!r}; columns: {list(row)}; set its "
                                 "text_column")
            text = row[self.column]
            if not text or not text.strip():
                continue
            if is_heldout(hashlib.sha256(text.encode()).hexdigest(), self.part.heldout_fraction) != (self.split == "heldout"):
                continue
            return text

    def _end_pass(self) -> None:
        self.end_pass()
        return None

    def end_pass(self) -> None:
        """Start the next pass (the current one left unfinished, or ended)."""
        self.passes, self.file, self.row, self._rows = self.passes + 1, 0, 0, None

    def state(self) -> dict:
        return {"passes": self.passes, "file": self.file, "row": self.row}

    def restore(self, state: dict) -> None:
        self.passes, self.file, self.row, self._rows = state["passes"], state["file"], state["row"], None


# ---------------------------------------------------------------------------------------------- a stream of blocks


class BlockStream:
    """Blocks (seq_len,) int64 of one stream of a corpus or mixture, for ever or for `passes` passes: documents mixed
    by characters, cut by BlockCutter, then given out window by window (`window` blocks permuted by a seeded shuffle;
    0: in order). A pass of a mixture ends when every part has been read to its end once (a part that ends sooner
    starts over, as `deepen.data.mix_corpora` upsamples); `max_tokens`: a pass ends after that many tokens. The
    tokens of a pass's last block carry into the next pass. Iterate it; `state()` / `restore()` for checkpoints."""

    BATCH = 16  # documents tokenised at once: the tokens waiting for a block (saved in checkpoints) stay few

    def __init__(self, spec, split: str, tokenizer, seq_len: int, *, stream: int = 0, streams: int = 1, seed: int = 0,
                 window: int = 0, passes: int | None = None, max_tokens: int | None = None, text_column: str = "text",
                 on_pass=None):
        self.parts = corpus_parts(spec, text_column)
        self.readers = [PartReader(p, split, stream, streams, seed, window > 0, text_column) for p in self.parts]
        self.cutter = BlockCutter(tokenizer, seq_len)
        self.name, self.split, self.stream, self.seed, self.window = spec, split, stream, seed, window
        self.passes, self.max_tokens, self.on_pass = passes, max_tokens, on_pass
        self.done_passes, self.windows, self.ready = 0, 0, []
        self.ahead: list[str | None] | None = None  # each part's next document (None: its pass has ended)

    # --- documents: the mixture's rule, with one document of look-ahead per part to know when a part has ended

    def _start_pass(self) -> None:
        self.chars = [0] * len(self.readers)
        self.read_through = [False] * len(self.readers)
        self.pass_tokens = self.pass_documents = 0
        self.ahead = []
        for part, reader in zip(self.parts, self.readers):
            text = reader.next_text()
            if text is None:
                raise ValueError(f"corpus {part.name!r} has no documents in its {self.split} split")
            self.ahead.append(text)

    def _next_document(self) -> str | None:
        if self.ahead is None:
            self._start_pass()
        if all(self.read_through):
            return None
        weights = [p.weight for p in self.parts]
        i = min(range(len(self.readers)), key=lambda j: (self.chars[j] / weights[j], j))
        if self.ahead[i] is None:  # read to its end before: it starts over
            self.ahead[i] = self.readers[i].next_text()
        text, self.ahead[i] = self.ahead[i], self.readers[i].next_text()
        self.chars[i] += max(len(text), 1)
        if self.ahead[i] is None:
            self.read_through[i] = True
        return text

    def _end_pass(self) -> None:
        if self.on_pass is not None:
            self.on_pass(self.done_passes, self.pass_documents, self.pass_tokens)
        self.done_passes += 1
        for reader, text in zip(self.readers, self.ahead):
            if text is not None:  # a part the pass did not read to its end (max_tokens): it starts its next pass
                reader.end_pass()
        self.ahead = None

    # --- blocks

    def _next_block(self) -> torch.Tensor | None:
        while not self.cutter.ready():
            if self.passes is not None and self.done_passes >= self.passes:
                return None
            texts = []
            while len(texts) < self.BATCH:
                text = self._next_document()
                if text is None:
                    break
                texts.append(text)
            if texts:
                cap = None if self.max_tokens is None else self.max_tokens - self.pass_tokens
                self.pass_tokens += self.cutter.feed(texts, cap)
                self.pass_documents += len(texts)
            if not texts or self.max_tokens is not None and self.pass_tokens >= self.max_tokens:
                if self.pass_documents == 0:
                    raise ValueError(f"corpus {self.name!r} has no documents in its {self.split} split")
                self._end_pass()
        return self.cutter.take()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if not self.ready:
            window = []
            while len(window) < max(self.window, 1):
                block = self._next_block()
                if block is None:
                    break
                window.append(block)
            if not window:
                raise StopIteration
            if self.window:
                random.Random(f"{self.seed}-{self.stream}-w{self.windows}").shuffle(window)
            self.windows += 1
            self.ready = window
        return self.ready.pop(0)

    # --- checkpoints

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON state, {"blocks": the window's blocks not given out yet (n, seq_len), "pending": the tokens not in a
        block yet}) of this stream."""
        blocks = torch.stack(self.ready) if self.ready else torch.zeros(0, self.cutter.seq_len, dtype=torch.long)
        mixture = None if self.ahead is None else {"ahead": list(self.ahead), "chars": list(self.chars),
                                                   "read_through": list(self.read_through),
                                                   "pass_tokens": self.pass_tokens, "pass_documents": self.pass_documents}
        return ({"readers": [r.state() for r in self.readers], "mixture": mixture, "done_passes": self.done_passes,
                 "windows": self.windows},
                {"blocks": blocks, "pending": torch.tensor(self.cutter.pending(), dtype=torch.long)})

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        for reader, saved in zip(self.readers, state["readers"]):
            reader.restore(saved)
        mixture = state["mixture"]
        if mixture is None:
            self.ahead = None
        else:
            self.ahead, self.chars = list(mixture["ahead"]), list(mixture["chars"])
            self.read_through = list(mixture["read_through"])
            self.pass_tokens, self.pass_documents = mixture["pass_tokens"], mixture["pass_documents"]
        self.done_passes, self.windows = state["done_passes"], state["windows"]
        self.cutter.restore(tensors["pending"].tolist())
        self.ready = list(tensors["blocks"].long())
