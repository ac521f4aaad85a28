"""The stages after growth: instruction tuning (loss on the response only), DPO and sDPO (each stage's reference
the stage before's result), and merging by averaging and SLERP (streamed, exact at the ends). Small for testing
efficiency: a 4-layer Llama of width 32, a few steps."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from deepen.cli import main
from deepen.config import load_config, stage_span
from deepen.dpo import run_dpo, stage_results
from deepen.instruct import collate, encode, encoded, load_examples
from deepen.merge import merge, merge_tensor, slerp
from deepen.objectives import dpo_loss
from deepen.runs import RunResult
from deepen.train import train


def stage(base, out, objective, domain, *overrides):
    return load_config(None, [f"model={base}", "method=full", f"objective={objective}", f"data.domain={domain}",
                              "data.seq_len=160", "train.steps=4", "train.global_batch=4", "train.micro_batch=2",
                              "train.lr=3e-3", "train.eval_every=2", "train.eval_batches=2", "train.save_every=2",
                              f"out={out}", *overrides])


# ---------------------------------------------------------------------------------------------- data


def test_instruction_examples_mark_only_the_response(small_llama_path):
    tokenizer = AutoTokenizer.from_pretrained(small_llama_path)
    train_set, held = load_examples("math-sft", "instructions"), load_examples("math-sft", "instructions", "heldout")
    assert len(train_set) > 10 * len(held) > 0 and not {e.prompt for e in train_set} & {e.prompt for e in held}
    e = train_set[0]
    ids, labels = encode(tokenizer, e.prompt, e.response, "alpaca", 512)
    response = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(response):] == response and labels[-len(response):] == response  # the response is learnt
    assert set(labels[:-len(response)]) == {-100}  # the templated prompt is not
    assert "### Instruction:" in tokenizer.decode(ids[:-len(response)]) and e.prompt in tokenizer.decode(ids)
    batch = collate([(ids, labels), (ids[:5], labels[:5])], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, len(ids))
    assert batch["attention_mask"][1].sum() == 5 and (batch["labels"][1, 5:] == -100).all()
    pairs = load_examples("math-pairs", "pairs")
    assert all(p.chosen != p.rejected and p.chosen.endswith(f"Answer: {p.answer}") for p in pairs[:50])
    assert all(p.rejected.rsplit("Answer: ", 1)[0] == p.chosen.rsplit("Answer: ", 1)[0] for p in pairs[:50])
    code = load_examples("code-sft", "instructions")[0]
    assert code.prompt.startswith("Write a Python function") and code.response.startswith("def ")


def test_bad_instruction_data_is_refused_clearly(small_llama_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(small_llama_path)
    with pytest.raises(ValueError, match="has no chat template; use data.template=alpaca"):
        encode(tokenizer, "q", "a", "model", 64)
    with pytest.raises(ValueError, match="no example fits data.seq_len=8"):
        encoded(tokenizer, load_examples("math-sft", "instructions")[:5], "alpaca", 8, "instructions")
    with pytest.raises(ValueError, match="'math-pairs' is a preference set; deepen sft takes one of"):
        load_examples("math-pairs", "instructions")
    with pytest.raises(FileNotFoundError, match="not a built-in set"):
        load_examples("nonsense", "pairs")
    assert main(["sft", "--config", "configs/tiny-sft.yaml", f"model={small_llama_path}", "data.template=model",
                 f"out={tmp_path / 'x'}"]) == 2
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- sft, dpo


def test_instruction_tuning_learns_the_responses(small_llama_path, tmp_path):
    out = train(stage(small_llama_path, tmp_path / "sft", "sft", "math-sft", "train.steps=6", "train.eval_every=6"),
                progress=False)
    run = RunResult.read(out.parent)
    assert run.last["ppl_domain"] < 0.7 * run.first["ppl_domain"]  # held-out response perplexity falls
    assert 0 <= run.last["accuracy"] <= 1 and "accuracy" in run.first
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_instruction_tuning_only_the_new_blocks(small_llama_path, tmp_path):
    grown = train(load_config(None, [f"model={small_llama_path}", "grow={method: llama-pro, groups: 2}",
                                     "data.seq_len=32", "data.max_tokens=4096", "train.steps=1", "train.global_batch=2",
                                     "train.micro_batch=2", "train.eval_batches=1", f"out={tmp_path / 'cpt'}"]),
                  progress=False)
    out = train(stage(grown, tmp_path / "sft", "sft", "math-sft", "method=llama-pro"), progress=False)
    before, after = load_file(grown / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {n.split(".")[2] for n in before if n.startswith("model.layers.") and not torch.equal(before[n], after[n])}
    assert changed == {"2", "5"}  # the manifest's new blocks, and nothing else
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("model.layers."))
    assert json.loads((out / "expansion.json").read_text())["trained"]["objective"] == "sft"


def test_the_dpo_loss_by_hand():
    chosen, rejected = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0])
    ref_c, ref_r = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -20.0])
    loss, margin = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    by_hand = [0.5 * ((-10 + 11) - (-12 + 11)), 0.5 * ((-20 + 20) - (-19 + 20))]  # 1.0, -0.5
    assert margin.tolist() == pytest.approx(by_hand)
    assert loss.item() == pytest.approx(sum(-math.log(1 / (1 + math.exp(-m))) for m in by_hand) / 2)
    zero, _ = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1)
    assert zero.item() == pytest.approx(math.log(2))  # the policy is its reference: loss ln 2


def test_dpo_and_sdpo(small_llama_path, tmp_path):
    one = run_dpo(stage(small_llama_path, tmp_path / "dpo", "dpo", "math-pairs", "train.steps=4"), progress=False)
    run = RunResult.read(one.parent)
    assert run.first["reward_margin"] == 0 and run.first["preference_accuracy"] == 0  # the reference itself
    assert run.records[1]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # step 1 starts at the reference
    assert run.last["preference_accuracy"] > 0.5 and run.last["reward_margin"] > 0
    two = run_dpo(stage(small_llama_path, tmp_path / "sdpo", "dpo", "math-pairs", "train.steps=5"), stages=2,
                  progress=False)
    first, second = stage_results(tmp_path / "sdpo", 2)
    assert two == tmp_path / "sdpo" / "stage-2" / "model" and [first.steps, second.steps] == [2, 3]  # all 5 steps
    assert second.config.model == str(tmp_path / "sdpo" / "stage-1" / "model")  # stage 1's result ...
    assert second.first["reward_margin"] == 0  # ... is stage 2's reference
    assert second.first["ppl_general"] == pytest.approx(first.last["ppl_general"], rel=1e-6)
    assert (first.config.dpo.beta, first.config.dpo.stages, first.config.dpo.stage, second.config.dpo.stage) == (
        0.1, 2, 0, 1)


def test_sdpo_stages_share_the_pairs_and_steps_whole():
    for n in range(0, 30):
        for stages in range(1, 7):
            spans = [stage_span(n, stages, k) for k in range(stages)]
            assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(e - b for b, e in spans) - min(e - b for b, e in spans) <= 1


def test_a_dpo_run_resumes_exactly(small_llama_path, tmp_path):
    class Stop(Exception):
        pass

    def stop(record, model):
        if record["step"] == 3:
            raise Stop

    config = stage(small_llama_path, tmp_path / "x", "dpo", "math-pairs", "train.steps=4")
    whole = train(stage(small_llama_path, tmp_path / "whole", "dpo", "math-pairs", "train.steps=4"), progress=False)
    with pytest.raises(Stop):
        train(config, progress=False, callback=stop)
    train(config, progress=False)  # resumes at step 2: the reference is recomputed from the starting model
    keys = ("step", "loss", "reward_margin", "preference_accuracy", "ppl_general")
    a, b = RunResult.read(whole.parent), RunResult.read(tmp_path / "x")
    assert [[r.get(k) for k in keys] for r in a.records] == [[r.get(k) for k in keys] for r in b.records]


def test_sft_and_dpo_commands(small_llama_path, tmp_path, capsys):
    assert main(["sft", "--config", "configs/tiny-sft.yaml", f"model={small_llama_path}", "train.steps=2",
                 "train.eval_batches=1", f"out={tmp_path / 'sft'}"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(["dpo", "--config", "configs/tiny-dpo.yaml", f"model={tmp_path / 'sft' / 'model'}", "train.steps=2",
                 "train.eval_batches=1", f"out={tmp_path / 'dpo'}", "--stages", "2"]) == 0
    assert "preference accuracy" in capsys.readouterr().out
    assert (tmp_path / "dpo" / "stage-2" / "model" / "config.json").is_file()
    assert main(["dpo", "--config", "configs/tiny-dpo.yaml", f"model={small_llama_path}", "train.steps=1",
                 f"out={tmp_path / 'bad'}", "--stages", "2"]) == 2
    assert "cannot be split over 2 sDPO stages" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- merge


def saved(tmp_path, name, seed, dtype=torch.float32, **changes):
    torch.manual_seed(seed)
    config = {**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2), **changes}
    LlamaForCausalLM(LlamaConfig(**config)).to(dtype).save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("method", ["average", "slerp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_algebra_is_exact_where_it_must_be(tmp_path, method, dtype):
    a, b = saved(tmp_path, "a", 0, dtype), saved(tmp_path, "b", 1, dtype)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for t, want in ((0.0, wa), (1.0, wb)):
        got = load_file(merge(a, b, tmp_path / f"{method}-{t}", method, t, progress=False) / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # A, B bit for bit
    self_merge = load_file(merge(a, a, tmp_path / "self", method, 0.3, progress=False) / "model.safetensors")
    assert all(torch.equal(self_merge[k], wa[k]) for k in wa)  # a model merged with itself: itself
    half = load_file(merge(a, b, tmp_path / "half", method, 0.5, progress=False) / "model.safetensors")
    assert {v.dtype for v in half.values()} == {dtype}  # the dtype kept
    k = "model.layers.0.mlp.up_proj.weight"
    if method == "average":
        assert torch.equal(half[k], ((wa[k].float() + wb[k].float()) / 2).to(dtype))
    assert json.loads((tmp_path / "half" / "merge.json").read_text())["method"] == method
    assert LlamaForCausalLM.from_pretrained(tmp_path / "half").config.num_hidden_layers == 2


def test_slerp_keeps_the_norm_and_falls_back_to_a_line():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    b = b * a.norm() / b.norm()  # equal norms
    for t in (0.25, 0.5, 0.9):
        m = slerp(a, b, t)
        assert m.norm().item() == pytest.approx(a.norm().item(), rel=1e-12)  # on the sphere
        angle = lambda x, y: math.acos((x @ y / (x.norm() * y.norm())).item())  # noqa: E731
        assert angle(a, m) == pytest.approx(t * angle(a, b), rel=1e-9)  # a share t of the way along the arc
    assert (a + b).norm() < a.norm() * 2 * 0.75  # while the average shrinks (nearly orthogonal: by about 1/sqrt 2)
    near = a + 1e-6 * b
    assert torch.allclose(slerp(a, near, 0.5), (a + near) / 2)  # nearly parallel: linear
    ints = torch.tensor([1, 2, 3])
    assert torch.equal(merge_tensor(ints, ints, "slerp", 0.5), ints)
    with pytest.raises(ValueError, match="cannot interpolate a torch.int64 tensor"):
        merge_tensor(ints, ints + 1, "average", 0.5)


def test_merge_refuses_models_of_other_shapes(tmp_path, capsys):
    a = saved(tmp_path, "a", 0)
    wide = saved(tmp_path, "wide", 1, hidden_size=64, intermediate_size=128)
    deep = saved(tmp_path, "deep", 1, num_hidden_layers=3)
    half = saved(tmp_path, "half", 1, dtype=torch.bfloat16)
    for other, message in ((wide, "is [64, 32] in"), (deep, "hold different tensors"), (half, "is F32 in")):
        assert main(["merge", str(a), str(other), str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    assert main(["merge", str(a), str(a), str(tmp_path / "out"), "--method", "slerp", "--t", "0.4"]) == 0
    assert main(["merge", str(a), str(a), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(a), str(a), str(tmp_path / "out2"), "--t", "1.5"]) == 2
    assert "between 0 (A) and 1 (B)" in capsys.readouterr().err
