"""The plain training loop (`deepen.loop.train_steps`, what notebooks use), held-out perplexity, and the tiny rung's
base: a small Llama pretrained from scratch by an ordinary run config (configs/tiny-base.yaml, `architecture:`),
cached so that every notebook and test starts from the same model."""

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deepen.batches import batches
from deepen.config import TrainConfig, load_config, recipe
from deepen.data import load_corpus, pack, tiny_tokenizer
from deepen.evaluate import perplexity, unigram_perplexity
from deepen.loop import NonFiniteLoss, train_steps
from deepen.runs import RunResult
from deepen.train import model_folder, tiny_base, train

# small for testing efficiency: the tiny base's shape cut to 2 layers of width 32, 60 training steps
MINI = ["model=null", "architecture={vocab_size: 4096, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, "
        "intermediate_size: 64, tie_embeddings: true}", "data.seq_len=64", f"data.max_tokens={64 * 512}",
        "train.steps=60", "train.global_batch=4", "train.lr=1e-2", "train.eval_every=60", "train.eval_batches=8",
        "train.save_every=100"]


@pytest.fixture(scope="module")
def general_blocks():
    tokenizer = tiny_tokenizer(4096)
    train = pack(load_corpus("general", max_documents=40), tokenizer, 64)
    heldout = pack(load_corpus("general", "heldout"), tokenizer, 64)[:32]
    return train, heldout


def small_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_batches_visit_every_block_once_per_epoch():
    blocks = torch.arange(10).view(10, 1)
    rows = torch.cat(list(batches(blocks, batch_size=3, steps=10, seed=0))).flatten().tolist()
    assert sorted(rows[:10]) == sorted(rows[10:20]) == list(range(10)) and rows[:10] != rows[10:20]
    assert rows == torch.cat(list(batches(blocks, 3, 10, seed=0))).flatten().tolist()


def test_train_steps_lowers_the_loss_and_repeats_exactly(general_blocks):
    train_blocks, heldout = general_blocks

    def run():
        model = small_model()
        before = perplexity(model, heldout)
        return model, before, train_steps(model, train_blocks, steps=40, lr=1e-2, global_batch=4, progress=False)

    model, before, losses = run()
    assert abs(losses[0] - torch.log(torch.tensor(4096.0)).item()) < 0.5  # a random model: about ln(vocab)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert perplexity(model, heldout) < before / 4
    assert run()[2] == losses  # same seed, same data order: the same run


def test_train_steps_uses_the_run_recipe_and_its_micro_batches(general_blocks):
    """The notebook loop is deepen train's recipe: TrainConfig's defaults; micro-batches give the same step."""
    a, b = small_model(), small_model()
    whole = train_steps(a, general_blocks[0], TrainConfig(steps=3, global_batch=4, micro_batch=4), progress=False)
    split = train_steps(b, general_blocks[0], TrainConfig(steps=3, global_batch=4, micro_batch=1), progress=False)
    assert split == pytest.approx(whole, rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 1; lower lr \(now 0.1\)$"):
        model = small_model()
        with torch.no_grad():
            model.model.embed_tokens.weight.fill_(float("nan"))
        train_steps(model, general_blocks[0], steps=2, lr=0.1, progress=False)


def test_frozen_parameters_do_not_move(general_blocks):
    model = small_model()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(True)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, general_blocks[0], steps=3, lr=1e-2, global_batch=2, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained)


def test_unigram_baseline_of_uniform_tokens_is_the_vocab_size():
    blocks = torch.arange(1000).repeat(20).view(-1, 100)
    assert unigram_perplexity(blocks, blocks, vocab_size=1000) == pytest.approx(1000, rel=1e-6)


def test_pretraining_from_scratch_is_a_run_like_any_other(tmp_path):
    out = train(load_config("configs/tiny-base.yaml", MINI + [f"out={tmp_path / 'mini'}"]), progress=False)
    run = RunResult.read(out.parent)
    losses = [r["loss"] for r in run.records if "loss" in r]
    assert len(losses) == 60 and losses[-1] < losses[0] - 1
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 4096
    heldout = pack(load_corpus("general", "heldout"), tiny_tokenizer(4096), 64)[:32]  # eval_batches × global_batch
    assert perplexity(model, heldout) == pytest.approx(run.last["ppl_general"], rel=1e-4)
    train_blocks = pack(load_corpus("general"), tiny_tokenizer(4096), 64, 64 * 512)
    assert run.last["ppl_general"] < unigram_perplexity(train_blocks, heldout, 4096) * 1.5  # near unigram already


def test_the_tiny_base_is_made_by_its_recipe_once(tmp_path, monkeypatch):
    config = recipe("tiny-base")
    assert config.architecture.n_layers == 8 and config.architecture.n_layers % 4 == 0  # 2 or 4 LLaMA Pro groups
    assert config.model is None and config.method == "full" and "tiny-base-" in config.out
    changed = load_config("configs/tiny-base.yaml", ["train.steps=1"])
    assert recipe("tiny-base").out == config.out  # one folder per distinct config
    assert changed.to_dict() != config.to_dict()
    monkeypatch.chdir(tmp_path)
    assert recipe("tiny-base").out == config.out  # the preset is found from any working directory
    (tmp_path / "tiny-base").mkdir()
    assert recipe("tiny-base") is None  # a folder of that name is that folder
    with pytest.raises(ValueError, match="give exactly one"):
        load_config("configs/tiny-base.yaml", ["model=smollm2"])
    with pytest.raises(ValueError, match="learns every parameter: use method full"):
        load_config("configs/tiny-base.yaml", ["method=llama-pro"])
    with pytest.raises(ValueError, match="unknown key 'architecture.dims'"):
        load_config("configs/tiny-base.yaml", ["architecture.dims=3"])


@pytest.mark.slow
def test_tiny_base_knows_some_english():
    model, tokenizer = tiny_base()  # trains on first use (minutes on one core), then cached
    config = recipe("tiny-base")
    seq_len = config.data.seq_len
    train_blocks = pack(load_corpus("general"), tokenizer, seq_len)
    heldout = pack(load_corpus("general", "heldout"), tokenizer, seq_len)[:256]
    ppl, unigram = perplexity(model, heldout), unigram_perplexity(train_blocks, heldout, len(tokenizer))
    assert ppl < unigram / 3 and ppl < len(tokenizer) / 20, (ppl, unigram)
    assert RunResult.read(config.out).last["ppl_general"] == pytest.approx(ppl, rel=1e-4)

    start = time.perf_counter()
    again, _ = tiny_base()
    assert time.perf_counter() - start < 20  # from the cache
    assert model_folder("tiny-base") == str(model.name_or_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
