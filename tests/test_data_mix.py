"""Weighted corpus mixtures ("code:0.6,math:0.4", as the LLaMA Pro paper mixes math and code): parsing, the
share of each corpus in every prefix, upsampling, the split, and the run config that names one."""

from pathlib import Path

import pytest

from deepen.config import load_config
from deepen.data import load_corpus, mix_corpora, pack, parse_mixture, tiny_tokenizer


def test_parse_mixture():
    assert parse_mixture("code:0.6,math:0.4") == [("code", 0.6), ("math", 0.4)]
    assert parse_mixture("code:3, math:2") == [("code", 3.0), ("math", 2.0)]  # relative weights
    assert parse_mixture("user/data:0.5,local/*.txt:.5") == [("user/data", 0.5), ("local/*.txt", 0.5)]
    for single in ("code", "user/data:config", "/data/file.txt"):
        assert parse_mixture(single) is None
    with pytest.raises(ValueError, match="'math' is not name:weight"):
        parse_mixture("code:0.6,math")
    with pytest.raises(ValueError, match="must be positive"):
        parse_mixture("code:0,math:1")
    with pytest.raises(ValueError, match="names a corpus twice"):
        parse_mixture("code:1,code:2")


def test_a_local_file_with_a_comma_in_its_name_is_one_corpus(tmp_path):
    path = tmp_path / "notes,2024.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert parse_mixture(str(path)) is None


def corpus(tmp_path, name, n, size):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.txt").write_text(f"{name} {i} " + "x" * size)
    return str(folder)


def test_every_prefix_holds_the_weights_and_the_small_corpus_repeats(tmp_path):
    big, small = corpus(tmp_path, "big", 200, 100), corpus(tmp_path, "small", 20, 100)
    mixed = load_corpus(f"{big}:3,{small}:1")
    texts = mixed["text"]
    for n in (40, 100, len(texts)):
        share = sum(len(t) for t in texts[:n] if t.startswith("big")) / sum(len(t) for t in texts[:n])
        assert share == pytest.approx(0.75, abs=1.5 / n)  # off by at most one document of ~110 characters
    train_big, train_small = load_corpus(big), load_corpus(small)
    assert set(texts) == set(train_big["text"]) | set(train_small["text"])  # everything read once...
    assert sum(t.startswith("small") for t in texts) > len(train_small)  # ...the small corpus more than once
    assert len(set(mixed["id"])) == len(texts)  # repeats get their own ids
    assert any(i.endswith("@1") for i in mixed["id"])


def test_split_is_each_corpus_split_then_mixed(tmp_path):
    a, b = corpus(tmp_path, "a", 300, 20), corpus(tmp_path, "b", 300, 20)
    train, heldout = load_corpus(f"{a}:1,{b}:1"), load_corpus(f"{a}:1,{b}:1", "heldout")
    assert set(heldout["text"]) == set(load_corpus(a, "heldout")["text"]) | set(load_corpus(b, "heldout")["text"])
    assert not set(train["text"]) & set(heldout["text"])
    assert load_corpus(f"{a}:1,{b}:1", max_documents=7)["text"] == train["text"][:7]


def test_empty_part_is_named(tmp_path):
    import datasets

    empty = datasets.Dataset.from_dict({"id": [], "text": []})
    full = datasets.Dataset.from_dict({"id": ["1"], "text": ["x"]})
    with pytest.raises(ValueError, match="corpus 'nothing' of the mixture has no documents"):
        mix_corpora([full, empty], [1.0, 1.0], ["something", "nothing"])


def test_a_run_config_names_a_mixture(tmp_path):
    assert load_config(None, ["data.domain=math:0.62,code:0.38"]).data.domain == "math:0.62,code:0.38"
    a, b = corpus(tmp_path, "a", 50, 200), corpus(tmp_path, "b", 50, 200)
    config = load_config(None, [f"data.domain={a}:0.62,{b}:0.38"])
    blocks = pack(load_corpus(config.data.domain), tiny_tokenizer(4096), seq_len=64, max_tokens=64 * 20)
    assert blocks.shape == (20, 64)


def test_a_mixture_written_as_records_is_the_short_form():
    from deepen.config import Corpus

    short = load_corpus("code:0.6,math:0.4", max_documents=200)
    records = load_corpus([Corpus("code", 0.6), Corpus("math", 0.4)], max_documents=200)
    assert short["id"] == records["id"] and short["text"] == records["text"]
    config = load_config(None, ["data.domain=[{name: code, weight: 3}, {name: math, weight: 2, text_column: text}]"])
    assert [(p.name, p.weight) for p in config.data.domain] == [("code", 3.0), ("math", 2.0)]
    with pytest.raises(ValueError, match=r"unknown key 'data.domain\[1\].weigth'"):
        load_config(None, ["data.domain=[{name: code}, {name: math, weigth: 2}]"])
    with pytest.raises(ValueError, match=r"data.domain is an empty list"):
        load_config(None, ["data.domain=[]"])


def test_the_7b_preset_states_the_papers_mix():
    """LLaMA Pro: Proof-Pile-2 (55B tokens) + the Stack-dedup's Python (22B at weight 1.5 = 33B): 62.5% / 37.5%, the
    Stack read from its data/python folder and its "content" column; forgetting on LAMBADA, all of it held out."""
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama2-7b-pro.yaml")
    math_part, code_part = config.data.domain
    assert (math_part.name, math_part.config) == ("EleutherAI/proof-pile-2", "default")
    assert (code_part.name, code_part.data_dir, code_part.text_column) == ("bigcode/the-stack-dedup", "data/python",
                                                                            "content")
    assert math_part.weight / (math_part.weight + code_part.weight) == pytest.approx(0.625)
    (lambada,) = config.data.general
    assert (lambada.name, lambada.split, lambada.heldout_fraction) == ("EleutherAI/lambada_openai", "test", 1.0)


def test_a_part_that_cannot_be_found_fails_before_training_naming_it(small_llama_path, tmp_path):
    from deepen.train import train

    config = load_config(None, [f"model={small_llama_path}", "grow={method: llama-pro, groups: 2}",
                                "data.streaming=true", f"data.domain=[{{name: code}}, {{name: {tmp_path / 'nowhere'}}}]",
                                f"out={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match=r"data.domain='code:1,.*nowhere:1'.*corpus '.*nowhere'"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
