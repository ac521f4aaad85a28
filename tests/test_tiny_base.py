"""The training loop, held-out perplexity, and the cached tiny base model that knows some English."""

import json
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deepen.train
from deepen.data import load_corpus, pack, tiny_tokenizer
from deepen.evaluate import perplexity, unigram_perplexity
from deepen.train import batches, load_config, pretrain_tiny, tiny_base, train_steps

# small for testing efficiency: the tiny base's shape cut to 2 layers of width 32, 60 training steps
MINI = {
    "model": {"vocab_size": 4096, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 64,
              "tie_embeddings": True},
    "data": {"corpus": "general", "seq_len": 64, "max_tokens": 64 * 512, "eval_blocks": 32},
    "train": {"steps": 60, "batch_size": 4, "lr": 1e-2, "seed": 0},
}


@pytest.fixture(scope="module")
def general_blocks():
    tokenizer = tiny_tokenizer(4096)
    train = pack(load_corpus("general", max_documents=40), tokenizer, 64)
    heldout = pack(load_corpus("general", "heldout"), tokenizer, 64)[:32]
    return train, heldout


def test_batches_visit_every_block_once_per_epoch():
    blocks = torch.arange(10).view(10, 1)
    rows = torch.cat(list(batches(blocks, batch_size=3, steps=10, seed=0))).flatten().tolist()
    assert sorted(rows[:10]) == sorted(rows[10:20]) == list(range(10)) and rows[:10] != rows[10:20]
    assert rows == torch.cat(list(batches(blocks, 3, 10, seed=0))).flatten().tolist()


def test_train_steps_lowers_the_loss_and_repeats_exactly(general_blocks):
    train, heldout = general_blocks

    def run():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        before = perplexity(model, heldout)
        return model, before, train_steps(model, train, steps=40, lr=1e-2, batch_size=4, progress=False)

    model, before, losses = run()
    assert abs(losses[0] - torch.log(torch.tensor(4096.0)).item()) < 0.5  # a random model: about ln(vocab)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert perplexity(model, heldout) < before / 4
    assert run()[2] == losses  # same seed, same data order: the same run


def test_frozen_parameters_do_not_move(general_blocks):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    for p in model.parameters():
        p.requires_grad_(False)
    layer = model.model.layers[1]
    for p in layer.parameters():
        p.requires_grad_(True)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, general_blocks[0], steps=3, lr=1e-2, batch_size=2, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_unigram_baseline_of_uniform_tokens_is_the_vocab_size():
    blocks = torch.arange(1000).repeat(20).view(-1, 100)
    assert unigram_perplexity(blocks, blocks, vocab_size=1000) == pytest.approx(1000, rel=1e-6)


def test_pretrain_saves_once_and_reports_honestly(tmp_path, monkeypatch):
    out = pretrain_tiny(MINI, out=tmp_path / "mini", progress=False)
    report = json.loads((out / "pretrain.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json"}
    assert len(report["losses"]) == 60 and report["losses"][-1] < report["losses"][0] - 1
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 4096
    tokenizer = tiny_tokenizer(4096)
    heldout = pack(load_corpus("general", "heldout"), tokenizer, 64)[:32]
    assert perplexity(model, heldout) == pytest.approx(report["heldout_perplexity"], rel=1e-4)
    assert report["heldout_perplexity"] < report["unigram_perplexity"] * 1.5  # 60 steps: near unigram already

    monkeypatch.setattr(deepen.train, "_pretrain", lambda *a, **k: pytest.fail("trained a second time"))
    assert pretrain_tiny(MINI, out=tmp_path / "mini") == out  # cached: no training


def test_config_is_found_from_anywhere_and_checked_key_by_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/tiny-base.yaml")
    assert cfg["model"]["n_layers"] == 8 and cfg["model"]["n_layers"] % 4 == 0  # LLaMA Pro plans with 2 or 4 groups
    with pytest.raises(ValueError, match="train.stepz is unknown"):
        load_config({**MINI, "train": {**MINI["train"], "stepz": 3}})
    with pytest.raises(ValueError, match="model.dims is unknown"):
        load_config({**MINI, "model": {**MINI["model"], "dims": 3}})
    with pytest.raises(ValueError, match="section model must map keys"):
        load_config({**MINI, "model": "smollm2"})
    with pytest.raises(ValueError, match="train.lr is missing"):
        load_config({**MINI, "train": {"steps": 1, "batch_size": 1}})


@pytest.mark.slow
def test_tiny_base_knows_some_english():
    model, tokenizer = tiny_base()  # trains on first use (minutes on one core), then cached
    cfg = load_config(deepen.train.TINY_BASE_CONFIG)
    seq_len = cfg["data"]["seq_len"]
    train = pack(load_corpus("general"), tokenizer, seq_len)
    heldout = pack(load_corpus("general", "heldout"), tokenizer, seq_len)
    ppl, unigram = perplexity(model, heldout[:256]), unigram_perplexity(train, heldout[:256], len(tokenizer))
    assert ppl < unigram / 3 and ppl < len(tokenizer) / 20, (ppl, unigram)

    start = time.perf_counter()
    again, _ = tiny_base()
    assert time.perf_counter() - start < 20  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
