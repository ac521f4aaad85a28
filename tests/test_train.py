"""deepen.train.train: which parameters learn per method, resume exactness, NaN stop, the global batch, configs,
and the `deepen train` / `deepen eval` commands. Small for testing efficiency: a 4-layer Llama of width 32 grown
to 6 layers, sequences of 32 tokens, a handful of steps."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from deepen.cli import main
from deepen.config import load_config
from deepen.grow import grow
from deepen.plan import llama_pro
from deepen.config import batch_layout
from deepen.rundir import CHECKPOINTS, METRICS
from deepen.train import train
from deepen.trainable import hold_frozen_in_bf16, select_trainable

GROW = "grow={method: llama-pro, groups: 2}"  # 4 -> 6 layers; new: 2 and 5
NEW = llama_pro(4, groups=2).new_layers


@pytest.fixture(scope="module")
def base(small_llama_path):
    return small_llama_path


def config(base, out, *overrides):
    return load_config(None, [f"model={base}", GROW, "data.seq_len=32", "data.max_tokens=4096", "train.steps=4",
                              "train.global_batch=4", "train.micro_batch=2", "train.lr=1e-2", "train.warmup=0.25",
                              "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", f"out={out}", *overrides])


def records(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, METRICS).read_text().splitlines()]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder, "model.safetensors"))


class Stop(Exception):
    pass


def stop_at(step):
    def callback(record, model):
        if record["step"] == step:
            raise Stop
    return callback


def test_llama_pro_trains_only_the_new_blocks(base, tmp_path):
    grown = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2)).state_dict()
    with pytest.raises(Stop):  # stop after the step-2 checkpoint, to look at its optimizer state
        train(config(base, tmp_path / "run"), progress=False, callback=stop_at(2))
    saved = load_file(tmp_path / "run" / CHECKPOINTS / "step-0000002" / "rank-00000.safetensors")
    new_params = sum(p.numel() for n, p in grown.items() if n.startswith(tuple(f"model.layers.{i}." for i in NEW)))
    exp_avg = sum(t.numel() for k, t in saved.items() if k.endswith("/exp_avg"))
    assert exp_avg == new_params > 0  # AdamW state for the new blocks only
    assert {k.split(".")[2] for k in saved if k.startswith("model/")} == {str(i) for i in NEW}  # only what learns
    assert not any(p.suffix in (".bin", ".pkl", ".pt") for p in (tmp_path / "run").rglob("*"))  # no pickle

    out = train(config(base, tmp_path / "run"), progress=False)  # resumes and finishes
    trained = weights(out)
    for name, before in grown.items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings: saved once
        new = name.startswith(tuple(f"model.layers.{i}." for i in NEW))
        assert torch.equal(trained[name], before) != new, name  # the rest bit-identical; every new tensor moved
    manifest = json.loads(Path(out, "expansion.json").read_text())
    assert manifest["new_layers"] == NEW and manifest["trained"] == {"method": "llama-pro", "objective": "lm", "domain": "code",
                                                                     "steps": 4, "tokens": 4 * 4 * 32}
    assert LlamaForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


def test_blocks_below_the_first_new_block_do_no_backward(base, tmp_path):
    needs_grad = {}

    def hook(layer, args, out):
        needs_grad.setdefault(layer.self_attn.layer_idx, out.requires_grad)  # the first forward after step 1

    def callback(record, model):
        if record["step"] == 1:
            for layer in model.model.layers:
                layer.register_forward_hook(hook)

    train(config(base, tmp_path / "run", "train.steps=2"), progress=False, callback=callback)
    assert needs_grad == {i: i >= NEW[0] for i in range(6)}  # no graph below block 2: no backward there


def test_full_changes_every_parameter(base, tmp_path):
    out = train(config(base, tmp_path / "run", "method=full", "train.steps=2"), progress=False)
    grown = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2)).state_dict()
    trained = weights(out)
    assert all(not torch.equal(trained[n], p) for n, p in grown.items() if n != "lm_head.weight")


def test_blocks_trains_only_the_listed_original_blocks(base, tmp_path):
    out = train(config(base, tmp_path / "run", "grow=null", "method=blocks", "blocks=[1, 3]", "train.steps=2"),
                progress=False)
    before = LlamaForCausalLM.from_pretrained(base).state_dict()
    trained = weights(out)
    changed = {n for n, p in before.items() if n in trained and not torch.equal(trained[n], p)}
    assert changed and all(n.startswith(("model.layers.1.", "model.layers.3.")) for n in changed)
    assert not (out / "expansion.json").exists()  # nothing was grown
    with pytest.raises(ValueError, match=r"blocks=\[1, 9\]: the model has decoder layers 0..3"):
        train(config(base, tmp_path / "bad", "grow=null", "method=blocks", "blocks=[1, 9]"), progress=False)
    with pytest.raises(ValueError, match="method blocks trains the decoder layers listed in blocks"):
        config(base, tmp_path / "bad", "method=blocks")
    with pytest.raises(ValueError, match="method blocks trains layers of the base as it is"):
        config(base, tmp_path / "bad", "method=blocks", "blocks=[1]")  # with the grow: section of config()
    with pytest.raises(ValueError, match="blocks must be a list of integers"):
        config(base, tmp_path / "bad", "method=blocks", "blocks=[a]")


def test_lora_trains_the_adapters_and_saves_a_merged_model(base, tmp_path):
    seen = {}

    def callback(record, model):
        seen["trainable"] = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}

    out = train(config(base, tmp_path / "run", "method=lora", "lora.r=4", "lora.targets=[q_proj, down_proj]",
                       "train.steps=2"), progress=False, callback=callback)
    per_layer = 4 * (32 + 32) + 4 * (64 + 32)  # r · (in + out) for q_proj (32 -> 32) and down_proj (64 -> 32)
    assert sum(seen["trainable"].values()) == 6 * per_layer
    assert all("lora_" in n for n in seen["trainable"])
    trained = weights(out)
    assert not any("lora" in n for n in trained)  # merged into the base weights
    grown = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2)).state_dict()
    changed = {n for n, p in grown.items() if n in trained and not torch.equal(trained[n], p)}
    assert changed and all(n.endswith(("q_proj.weight", "down_proj.weight")) for n in changed)


def test_an_interrupted_run_resumes_exactly(base, tmp_path):
    whole = train(config(base, tmp_path / "whole", "train.steps=6"), progress=False)
    with pytest.raises(Stop):  # killed at step 1, before any checkpoint: a rerun starts afresh
        train(config(base, tmp_path / "cut", "train.steps=6"), progress=False, callback=stop_at(1))
    with pytest.raises(Stop):  # killed after step 3, which was logged but not checkpointed (last: step 2)
        train(config(base, tmp_path / "cut", "train.steps=6"), progress=False, callback=stop_at(3))
    assert [r["step"] for r in records(tmp_path / "cut")] == [0, 1, 2, 3]
    resumed = train(config(base, tmp_path / "cut", "train.steps=6"), progress=False)

    def curve(out):
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("ppl_general"), r.get("ppl_domain")) for r in records(out)]

    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")  # exactly: the same floats
    assert [r["step"] for r in records(tmp_path / "cut")] == list(range(7))
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert train(config(base, tmp_path / "cut", "train.steps=6"), progress=False) == resumed  # done: no work


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base, tmp_path):
    def poison(record, model):
        if record["step"] == 3:
            with torch.no_grad():
                model.model.layers[NEW[0]].mlp.down_proj.weight.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4.*step-0000002"):
        train(config(base, tmp_path / "run", "train.steps=6"), progress=False, callback=poison)
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir()) == ["step-0000002"]
    assert not (tmp_path / "run" / "model").exists()


def test_the_global_batch_does_not_depend_on_the_micro_batch(base, tmp_path):
    a = records(train(config(base, tmp_path / "a", "train.micro_batch=1", "train.steps=3"), progress=False).parent)
    b = records(train(config(base, tmp_path / "b", "train.micro_batch=4", "train.steps=3"), progress=False).parent)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for x, y in zip(a[1:], b[1:]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["lr"] == y["lr"]
    assert a[-1]["ppl_domain"] == pytest.approx(b[-1]["ppl_domain"], rel=1e-4)


def test_micro_batch_is_the_largest_that_divides_each_process_share():
    assert batch_layout(8, 8, 1) == (8, 8, 1)
    assert batch_layout(8, 8, 2) == (4, 4, 1)  # configs/tiny-cpu.yaml under torchrun --nproc-per-node 2
    assert batch_layout(8, 3, 1) == (8, 2, 4)  # 3 does not divide 8: micro-batches of 2
    assert batch_layout(1024, 4, 16) == (64, 4, 16)  # the 7B preset on 2 nodes of 8 GPUs
    assert batch_layout(12, 5, 2) == (6, 3, 2)
    with pytest.raises(ValueError, match=r"train.global_batch=8 cannot be split over 3 processes; run 1, 2, 4, 8"):
        batch_layout(8, 8, 3)


def test_bad_configs_fail_before_any_work_naming_the_key(base, tmp_path):
    with pytest.raises(ValueError, match="unknown key 'train.stepz'"):
        config(base, tmp_path / "run", "train.stepz=3")
    with pytest.raises(ValueError, match="data.max_examples must be at least 1"):
        config(base, tmp_path / "run", "data.max_examples=0")
    with pytest.raises(ValueError, match="method llama-pro trains only the layers a plan added"):
        train(load_config(None, [f"model={base}", f"out={tmp_path / 'run'}"]), progress=False)
    with pytest.raises(FileNotFoundError, match="data.domain='no-such-corpus'"):
        train(config(base, tmp_path / "run", "data.domain=no-such-corpus"), progress=False)
    with pytest.raises(ValueError, match="model='no-such-model'"):
        train(config(base, tmp_path / "run", "model=no-such-model"), progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(Stop):
        train(config(base, tmp_path / "run"), progress=False, callback=stop_at(1))
    with pytest.raises(ValueError, match=r"another config \(train.lr: 0.01 then, 0.001 now\)"):
        train(config(base, tmp_path / "run", "train.lr=1e-3"), progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["objective"], saved["dpo"], saved["data"]["template"]  # as a run begun before those keys existed
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert (train(config(base, tmp_path / "run"), progress=False) / "model.safetensors").is_file()  # it resumes


def test_cli_train_and_eval(base, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {base}\ngrow: {{method: llama-pro, groups: 2}}\ndata: {{seq_len: 32, max_tokens: 4096}}\n"
                    "train: {steps: 2, global_batch: 2, micro_batch: 2, eval_every: 2, eval_batches: 1}\n")
    assert main(["train", "--config", str(path), f"out={tmp_path / 'run'}", "--method", "full"]) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"] == "full"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "model"), "--data", "general,code", "--seq-len", "32",
                 "--blocks", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"general", "code"} and all(r["perplexity"] > 1 and r["tokens"] == 62 for r in result.values())
    assert main(["train", "--config", str(path), "train.steps=0"]) == 2
    assert "train.steps must be at least 1, got 0" in capsys.readouterr().err


def test_tiny_cpu_preset_grows_the_tiny_base_by_two_blocks():
    run = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    plan = run.plan(8)  # the tiny base has 8 layers (configs/tiny-base.yaml)
    assert (run.model, run.method, plan.n_layers, plan.new_layers) == ("tiny-base", "llama-pro", 10, [4, 9])
    assert run.train.steps * run.train.global_batch * run.data.seq_len <= 200_000  # about a minute on one core


def test_gradient_checkpointing_and_bf16(base, tmp_path):
    plain = records(train(config(base, tmp_path / "plain", "train.steps=2"), progress=False).parent)
    on = []
    checkpointed = records(train(config(base, tmp_path / "ckpt", "train.steps=2", "train.gradient_checkpointing=true"),
                                 progress=False, callback=lambda r, m: on.append(m.is_activation_checkpointing)).parent)
    assert on == [True, True]
    # use_reentrant=False: the new blocks get their gradients although their inputs need none
    assert [r["loss"] for r in checkpointed[1:]] == pytest.approx([r["loss"] for r in plain[1:]], rel=1e-5)
    assert checkpointed[-1]["ppl_domain"] == pytest.approx(plain[-1]["ppl_domain"], rel=1e-4)
    half = records(train(config(base, tmp_path / "bf16", "train.steps=2", "train.precision=bf16"), progress=False).parent)
    assert [r["loss"] for r in half[1:]] == pytest.approx([r["loss"] for r in plain[1:]], rel=2e-2)
    assert [r["loss"] for r in half[1:]] != [r["loss"] for r in plain[1:]]  # autocast did run in bf16


def test_bf16_llama_pro_holds_frozen_weights_in_bf16_and_resumes_exactly(base, tmp_path):
    new = tuple(f"model.layers.{i}." for i in NEW)
    held = []

    def dtypes(record, model):
        held.append(({n: p.dtype for n, p in model.named_parameters()},  # a tied parameter is listed once
                     model.lm_head.weight is model.model.embed_tokens.weight))

    bf16 = ["train.steps=6", "train.precision=bf16"]
    whole = train(config(base, tmp_path / "whole", *bf16), progress=False, callback=dtypes)
    assert len(held) == 6 and all(h == held[0] for h in held)
    during, tied = held[0]
    assert tied and "model.embed_tokens.weight" in during
    assert {n for n, d in during.items() if d == torch.float32} == {n for n in during if n.startswith(new)}
    assert {d for n, d in during.items() if not n.startswith(new)} == {torch.bfloat16}  # frozen: 2 bytes each
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(whole.parent)[1:])

    # saved in fp32: the new blocks as trained, the rest the base's weights rounded to bf16 (held so, never changed)
    grown = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2)).state_dict()
    trained = weights(whole)
    assert {t.dtype for t in trained.values()} == {torch.float32} and "lm_head.weight" not in trained  # tied: once
    for name, before in grown.items():
        if name != "lm_head.weight":
            expected = before if name.startswith(new) else before.to(torch.bfloat16).float()
            assert torch.equal(trained[name], expected) != name.startswith(new), name
    assert json.loads((whole / "config.json").read_text())["dtype"] == "float32"
    assert LlamaForCausalLM.from_pretrained(whole).dtype == torch.float32

    with pytest.raises(Stop):  # killed after step 3; the last checkpoint is step 2
        train(config(base, tmp_path / "cut", *bf16), progress=False, callback=stop_at(3))
    resumed = train(config(base, tmp_path / "cut", *bf16), progress=False)
    keys = ("step", "loss", "lr", "ppl_general", "ppl_domain")
    assert [[r.get(k) for k in keys] for r in records(tmp_path / "cut")] == \
        [[r.get(k) for k in keys] for r in records(tmp_path / "whole")]  # exactly: the same floats
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_bf16_holds_frozen_weights_in_bf16_but_where_a_sharded_unit_mixes_them(base, tmp_path):
    seen = []
    out = train(config(base, tmp_path / "lora", "method=lora", "lora.r=4", "train.steps=1", "train.precision=bf16"),
                progress=False, callback=lambda record, model: seen.append(
                    {(p.requires_grad, p.dtype) for p in model.parameters()}))
    assert seen == [{(False, torch.bfloat16), (True, torch.float32)}]  # unsharded: LoRA's base in bf16
    merged = LlamaForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}  # merged into fp32 weights, saved in fp32

    def grown(method, layers, also_train=()):
        model = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2))
        select_trainable(model, method, layers, also_train)
        return model, hold_frozen_in_bf16(model)

    for method, layers, also_train in [("full", [], ()), ("blocks", [1, 3], ["norm"]), ("blocks", [1], ["embed"])]:
        model, cast = grown(method, layers, also_train)  # sharded (the default): norms learn inside frozen layers
        assert not cast and {p.dtype for p in model.parameters()} == {torch.float32}, (method, also_train)
    model, cast = grown("blocks", [1, 3])
    assert cast and {n.split(".")[2] for n, p in model.named_parameters()
                     if p.dtype == torch.float32 and n.startswith("model.layers.")} == {"1", "3"}
    assert model.model.norm.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_two_processes_keep_the_global_batch(base, tmp_path):
    """torchrun with 2 CPU processes (gloo): each does half the global batch; the same losses as one process."""
    import os
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {base}\ngrow: {{method: llama-pro, groups: 2}}\ndata: {{seq_len: 32, max_tokens: 4096}}\n"
                    "train: {steps: 3, global_batch: 4, micro_batch: 1, lr: 1.0e-2, eval_every: 3, eval_batches: 1}\n")
    one = records(train(load_config(path, [f"out={tmp_path / 'one'}"]), progress=False).parent)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "deepen", "train", "--config", str(path),
                    f"out={tmp_path / 'two'}"], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    two = records(tmp_path / "two")
    assert [r["step"] for r in two] == [0, 1, 2, 3]
    assert [r["loss"] for r in two[1:]] == pytest.approx([r["loss"] for r in one[1:]], rel=1e-5)


def test_how_new_blocks_start_and_whether_step_0_is_the_base(base, tmp_path):
    """grow.init: plan (zeroed, LLaMA Pro) and masked (MSG: a full copy behind a mask at 0) are the base at step 0,
    exactly; copy and random are not, and their base is measured before growing."""
    first, last = {}, {}
    for init in ("plan", "masked", "copy", "random"):
        out = train(config(base, tmp_path / init, f"grow={{method: llama-pro, groups: 2, init: {init}}}",
                           "grow.mask_ramp=0.5", "train.steps=2"), progress=False)
        first[init], last[init] = records(out.parent)[0], records(out.parent)[-1]
        assert LlamaForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    assert first["plan"]["ppl_general"] == first["plan"]["base_ppl_general"]
    assert first["masked"]["ppl_general"] == first["masked"]["base_ppl_general"] == first["plan"]["ppl_general"]
    for init in ("copy", "random"):
        assert first[init]["base_ppl_general"] == first["plan"]["ppl_general"] != first[init]["ppl_general"]
    assert last["masked"]["ppl_domain"] != last["plan"]["ppl_domain"]  # it learnt, from other weights
    with pytest.raises(ValueError, match="grow.init='half' is not one of plan, copy, random, zeros, masked"):
        config(base, tmp_path / "bad", "grow={method: llama-pro, groups: 2, init: half}")


def test_branch_masks_fold_into_the_weights(base):
    from deepen.grow import BranchMasks

    model = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2), init="copy").eval()
    plain = grow(LlamaForCausalLM.from_pretrained(base), llama_pro(4, groups=2)).eval()
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    masks = BranchMasks(model, NEW)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)  # m = 0: exactly the zeroed copy, the base
        masks.set(0.5)
        half = model(ids).logits
        masks.remove()
        model.load_state_dict(masks.fold(model.state_dict()))
        torch.testing.assert_close(model(ids).logits, half, rtol=1e-5, atol=1e-6)  # folded: the same function


# Each speed switch (train.*) against the plain path: the same losses within a tolerance stated per switch (fp32 on
# a CPU: what differs is only the order of floating-point sums — AdamW's fused kernel, the loss added up chunk by
# chunk, the compiled layers' fused kernels — compounded over 4 steps at lr 1e-2), and a run cut and resumed with
# the switch on gives exactly the floats of the uninterrupted one.
SWITCHES = {
    "fused AdamW": (["train.fused_adamw=true"], 1e-4),
    "chunked loss": (["train.loss_chunk=24"], 1e-5),  # 2 x 31 targets per micro-batch: 3 chunks, the last short
    "activation checkpointing auto (off on a CPU)": (["train.gradient_checkpointing=auto"], 0.0),
    "precision auto": (["train.precision=auto"], None),  # bf16 where the CPU has it natively: compared with bf16
    "compiled layers": (["train.compile=true"], 1e-4),
}


@pytest.mark.parametrize("switch", [pytest.param(k, marks=pytest.mark.slow) if "compiled" in k else k
                                    for k in SWITCHES])
def test_a_speed_switch_keeps_the_losses_and_resumes_exactly(switch, base, tmp_path):
    from deepen.loop import native_bf16

    overrides, rel = SWITCHES[switch]
    if rel is None:  # precision auto is bf16 or fp32 by the CPU: the same losses as that precision, exactly
        reference = ["train.precision=" + ("bf16" if native_bf16("cpu") else "fp32")]
        rel = 0.0
    else:
        reference = []
    plain = records(train(config(base, tmp_path / "plain", *reference), progress=False).parent)
    whole = records(train(config(base, tmp_path / "whole", *overrides), progress=False).parent)
    assert [r["loss"] for r in whole[1:]] == pytest.approx([r["loss"] for r in plain[1:]], rel=rel, abs=0)
    with pytest.raises(Stop):  # cut after step 3: the last checkpoint is step 2's
        train(config(base, tmp_path / "cut", *overrides), progress=False, callback=stop_at(3))
    cut = records(train(config(base, tmp_path / "cut", *overrides), progress=False).parent)

    def curve(rows):
        return [(r["step"], r.get("loss"), r.get("lr"), r.get("ppl_general"), r.get("ppl_domain")) for r in rows]

    assert curve(cut) == curve(whole)


def test_checkpointing_auto_asks_the_planner_whether_the_run_fits(base):
    from deepen.budget import budget, fits_without_checkpointing

    run = load_config("configs/llama2-7b-pro.yaml", ["train.gradient_checkpointing=auto"])
    assert not fits_without_checkpointing(run, 8, 80e9, "fsdp")  # micro-batches of 4 x 4096: no
    assert budget(run, gpus=8, gpu_memory=80).checkpointing  # so auto turns it on
    small = config(base, "unused", "train.gradient_checkpointing=auto")
    assert fits_without_checkpointing(small, 1, 80e9) and not budget(small, gpus=1).checkpointing


def test_the_chunked_loss_is_the_whole_loss_and_gradient(base):
    from deepen.loop import next_token_loss

    model = LlamaForCausalLM.from_pretrained(base)
    ids = torch.randint(0, 4096, (2, 17))
    grads = []
    for chunk in (None, 5):
        model.zero_grad()
        loss = next_token_loss(chunk)(model, ids)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (whole, a), (pieces, b) = grads
    assert pieces == pytest.approx(whole, rel=1e-6)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(a, b))


def test_the_learning_rate_is_a_function_of_the_step():
    """Warmup then cosine to lr * min_lr_ratio — the curve transformers' get_cosine_with_min_lr_schedule_with_warmup
    draws — computed from the step alone, so a schedule loaded at a step with another peak rate goes on from there."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from deepen.config import TrainConfig
    from deepen.loop import Schedule, learning_rate

    t = TrainConfig(steps=50, lr=3e-4, warmup=0.1, min_lr_ratio=0.1)
    reference = get_cosine_with_min_lr_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=t.lr), 5, 50,
                                                            min_lr_rate=0.1)
    for step in range(51):
        assert learning_rate(t, step) == pytest.approx(reference.get_last_lr()[0], rel=1e-12)
        reference.step()
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    schedule = Schedule(optimizer, TrainConfig(steps=50, lr=1e-4, warmup=0.1, min_lr_ratio=0.1))
    schedule.load_state_dict({"last_epoch": 20})  # a checkpoint of a run at lr 3e-4, resumed at 1e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(learning_rate(t, 20) / 3, rel=1e-12)
