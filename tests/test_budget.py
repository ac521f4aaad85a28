"""The budget planner: exact parameter counts at 7B (meta device), the FLOP and memory models, a real CPU step
that the planner's gradient and optimizer-state counts must match, the activation model against what autograd
saves, the presets and the launch configs."""

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as T
from torch.autograd.graph import saved_tensors_hooks

from deepen import budget as B
from deepen.config import load_config
from deepen.grow import grow
from deepen.plan import llama_pro

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PRO = ROOT / "configs" / "llama2-7b-pro.yaml"
SOLAR = ROOT / "configs" / "mistral-solar-10.7b.yaml"
SMOL = ROOT / "configs" / "smol-gpu.yaml"
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def run_config(*overrides):
    return load_config(None, list(overrides))


def test_exact_parameter_counts_at_7b():
    llama = B.shape_of(run_config("model=meta-llama/Llama-2-7b-hf", "method=full"))
    assert llama.params == 6_738_415_616 and {s.params for s in llama.blocks} == {202_383_360}
    pro = B.shape_of(load_config(LLAMA_PRO))
    assert (pro.params, pro.trainable) == (8_357_482_496, 1_619_066_880)
    assert pro.new_layers == tuple(range(4, 40, 5))
    solar = B.shape_of(load_config(SOLAR))
    assert solar.params == solar.trainable == 10_731_524_096 and len(solar.blocks) == 48
    assert {s.params for s in solar.blocks} == {218_112_000}


def test_full_training_is_6n_plus_attention():
    shape = B.shape_of(load_config(LLAMA_PRO, ["method=full"]))
    L, h, V, T_ = 40, 4096, 32000, 4096
    n_matmul = shape.params - V * h - (2 * L + 1) * h  # all but the embedding table (a lookup) and the norms
    assert B.training_flops(shape.stages).model == 6 * n_matmul + 12 * L * h * T_


def test_llama_pro_flops_at_7b():
    """Blocks 0-3 (below the first new block, 4) do no backward; the 28 frozen blocks above and the head do
    activation gradients only; the 8 new blocks do everything. Predicted speed-up over full: about 1.37."""
    shape = B.shape_of(load_config(LLAMA_PRO))
    P, A, head = 202_383_360 - 2 * 4096, 4 * 4096 * 4096, 32000 * 4096  # matmul params per block, attention
    flops = B.training_flops(shape.stages)
    assert flops.forward == 40 * (2 * P + A) + 2 * head
    assert flops.backward_activations == 36 * (2 * P + 2 * A) + 2 * head
    assert flops.backward_weights == 8 * 2 * P
    b = B.budget(LLAMA_PRO, gpus=8)
    assert b.speedup == pytest.approx(1.37, abs=0.005)


def test_the_flop_model_matches_the_flops_a_training_step_does():
    """torch's FLOP counter over one forward and backward of the tiny base grown 8 -> 10, LLaMA Pro against full
    training of the same model: the ratio deepen.budget predicts (blocks below the first new one do no backward,
    frozen blocks above compute only input gradients) is the ratio counted, within 3%."""
    from torch.utils.flop_counter import FlopCounterMode

    from deepen.plan import llama_pro
    from deepen.train import tiny_base

    run = run_config("model=tiny-base", "grow={method: llama-pro, groups: 2}", "data.seq_len=64")
    base, _ = tiny_base()
    plan = llama_pro(base.config.num_hidden_layers, groups=2)
    counted = {}
    for method in ("llama-pro", "full"):
        model = grow(base, plan).train()
        B.select_trainable(model, method, plan.new_layers)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        counted[method] = counter.get_total_flops()
    assert counted["full"] / counted["llama-pro"] == pytest.approx(B.budget(run).speedup, rel=0.03)


def test_memory_at_7b():
    one = B.budget(LLAMA_PRO, gpus=1, strategy="fsdp")
    assert one.memory["frozen weights"] == 6_738_415_616 * 2  # bf16
    state = one.memory["trainable weights"] + one.memory["gradients"] + one.memory["optimizer"]
    assert state == 1_619_066_880 * 16  # fp32 weight, gradient, AdamW m and v
    assert one.fits and not B.budget(LLAMA_PRO, gpus=1, method="full").fits  # 8.3B full: ~134 GB of state alone
    zero3 = B.budget(LLAMA_PRO, gpus=8, strategy="zero3")
    assert zero3.memory["trainable weights"] * 8 == 1_619_066_880 * 6  # bf16 + fp32 master: 18 bytes in all
    eight = B.budget(LLAMA_PRO, gpus=8)
    assert eight.memory["frozen weights"] * 8 == one.memory["frozen weights"]
    ddp = B.budget(LLAMA_PRO, gpus=8, strategy="ddp")
    assert ddp.memory["frozen weights"] == one.memory["frozen weights"] and ddp.memory["ddp buckets"] > 0
    for strategy in B.STRATEGIES:
        for checkpointing in (True, False):
            kw = dict(gpus=8, strategy=strategy, checkpointing=checkpointing)
            assert B.budget(LLAMA_PRO, **kw).memory_total < B.budget(LLAMA_PRO, method="full", **kw).memory_total


def test_time_for_a_token_budget():
    b = B.budget(LLAMA_PRO, gpus=16, mfu=0.4, tokens=80e9)
    assert b.tokens_per_s == pytest.approx(16 * 989e12 * 0.4 / b.flops.model)
    assert b.gpu_hours == pytest.approx(80e9 / b.tokens_per_s * 16 / 3600)
    assert B.budget(LLAMA_PRO).tokens == 15_900 * 1024 * 4096  # the config's own budget by default


def tiny_llama(dtype=torch.float32, layers=4, kv_heads=2):
    """A real (not meta) Llama: small for testing efficiency."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=True)
    return T.LlamaForCausalLM(config).to(dtype)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first new block: its input needs no grad
def test_planner_counts_match_a_real_training_step(tmp_path):
    """Grow a tiny Llama, train only the new blocks for one AdamW step: exactly the parameters the planner calls
    trainable get a gradient and optimizer state; the blocks below the first new block run no backward."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    plan = llama_pro(4, groups=2)
    model = grow(base, plan)
    B.select_trainable(model, "llama-pro", plan.new_layers)
    shape = B.shape_of(run_config(f"model={tmp_path / 'base'}", "grow={method: llama-pro, groups: 2}",
                                  "data.seq_len=16"))
    ran_backward = set()
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: ran_backward.add(i))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    grads = sum(p.numel() for p in model.parameters() if p.grad is not None)
    state = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert grads == shape.trainable and state == 2 * shape.trainable > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    first = plan.new_layers[0]
    assert ran_backward == set(range(first, plan.n_layers))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft asks transformers a deprecated question
def test_lora_count_matches_peft(tmp_path):
    import peft

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    shape = B.shape_of(run_config(f"model={tmp_path / 'base'}", "method=lora", "lora.r=4"))
    targets = load_config(None).lora.targets
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets))
    assert shape.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_bytes_per_token(model, ids) -> dict[str, float]:
    """Bytes autograd saves for the backward, per token, by the decoder layer that first saved them ("head" for
    the rest); parameters and the shared rotary cos/sin are left out."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.model.rotary_emb.register_forward_hook(
        lambda m, a, out: skip.update(t.untyped_storage().data_ptr() for t in out))
    where, seen = {"now": "head"}, {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: where.update(now=i))
        layer.register_forward_hook(lambda m, a, o: where.update(now="head"))

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in skip and key not in seen:
            seen[key] = (where["now"], t.untyped_storage().nbytes())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids.clone(), use_cache=False)
    out: dict = {}
    for name, nbytes in seen.values():
        out[name] = out.get(name, 0) + nbytes / ids.numel()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["llama-pro", "full"])
def test_activation_model_matches_what_autograd_saves(method, dtype, tmp_path):
    base = tiny_llama(dtype, layers=4, kv_heads=2)
    base.save_pretrained(tmp_path / "base")
    run = run_config(f"model={tmp_path / 'base'}", "grow={method: llama-pro, groups: 2}", f"method={method}",
                     "data.seq_len=32")
    shape = B.shape_of(run)
    plan = llama_pro(4, groups=2)
    model = grow(base, plan)
    B.select_trainable(model, method, plan.new_layers)
    saved = saved_bytes_per_token(model.train(), torch.randint(0, 512, (2, 32)))
    e = 2 if dtype == torch.bfloat16 else 4
    grad_below = shape.stages[0].trainable > 0
    for i, stage in enumerate(shape.blocks):
        input_grad, grad_below = grad_below, grad_below or stage.trainable > 0
        expected = B.block_activation_bytes(shape, stage.trainable > 0, input_grad, e) if grad_below else 0
        assert saved.get(i, 0) == expected, f"layer {i}"
    head = B.head_activation_bytes(shape, shape.stages[-1].trainable > 0, e)
    head += 4 * shape.vocab  # the fp32 log-softmax the loss keeps: in activation_bytes' logits (chunked with them)
    head += 8 if shape.stages[0].trainable else 0  # a trainable embedding keeps the token ids
    assert saved["head"] == pytest.approx(head, abs=0.1)  # + the scalar loss


def test_checkpointing_keeps_one_input_per_layer(tmp_path):
    run = load_config(LLAMA_PRO)
    shape = B.shape_of(run)
    kept = B.activation_bytes(shape, checkpointing=True)["activations"]
    full = B.activation_bytes(shape, checkpointing=False)["activations"]
    assert kept < full / 5
    assert B.budget(run, gpus=8, checkpointing=True).flops.recompute > 0
    assert B.budget(run, gpus=8, checkpointing=False).flops.recompute == 0


def test_llama_pro_without_a_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="add a grow: section"):
        B.budget(run_config("model=tiny-base", "method=llama-pro"))


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="cannot find the shape of model 'nobody/nothing'"):
        B.model_config("nobody/nothing")


def test_presets_fit_their_rung():
    assert B.budget(LLAMA_PRO, gpus=8, gpu_memory=80).fits
    assert B.budget(LLAMA_PRO, gpus=1, gpu_memory=80).fits  # one 80 GB GPU, with checkpointing
    assert B.budget(SOLAR, gpus=8, gpu_memory=80).fits
    smol = B.budget(SMOL, gpus=1, gpu_memory=24)
    assert smol.fits and smol.accumulation == 4
    eight = B.budget(LLAMA_PRO, gpus=8)
    assert eight.accumulation == 32 and not eight.notes  # llama-pro: deepen train holds frozen weights in bf16
    assert not B.budget(LLAMA_PRO, gpus=8, method="full").notes
    assert B.budget(LLAMA_PRO, gpus=8, method="lora").notes == [
        "frozen weights are counted in bf16 (2 bytes); deepen train holds them in fp32 where an FSDP unit (a decoder "
        "layer; the embeddings, norm and head) mixes frozen and trainable parameters, as lora does here: "
        "+2.1 GB per GPU"]


@pytest.mark.parametrize("overrides, fp32", [
    (["grow={method: llama-pro, groups: 2}"], False),  # new blocks learn, every other unit is frozen
    (["method=blocks", "blocks=[1, 3]"], False),
    (["method=blocks", "blocks=[1, 3]", "also_train=[norm]"], True),  # norms learn inside frozen layers
    (["method=blocks", "blocks=[1, 3]", "also_train=[embed_tokens]"], True),  # embeddings learn, the final norm not
    (["method=lora"], True),  # adapters inside frozen layers
    (["method=full"], False),  # nothing frozen
])
def test_frozen_weights_are_in_fp32_only_where_a_unit_mixes(overrides, fp32):
    """The same rule as deepen.train.uniform_units (tests/test_train.py runs it on real models)."""
    assert B.frozen_in_fp32(B.shape_of(run_config("model=tiny-base", *overrides))) == fp32


def test_cli(capsys):
    parser = argparse.ArgumentParser()
    B.add_arguments(parser)
    assert B.run(parser.parse_args(["--config", str(LLAMA_PRO), "--gpus", "8", "--gpu-memory", "80"])) == 0
    out = capsys.readouterr().out
    assert "8,357,482,496" in out and "1,619,066,880" in out and "1.37x" in out and "llama-pro" in out
    args = parser.parse_args(["--config", str(LLAMA_PRO), "--gpus", "16", "--tokens", "80e9", "--json",
                              "--no-checkpointing", "train.micro_batch=1"])
    assert B.run(args) == 0
    pro, full = json.loads(capsys.readouterr().out)
    assert pro["tokens"] == 80e9 and pro["micro_batch"] == 1 and not pro["checkpointing"]
    assert full["method"] == "full" and full["speedup"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Launch configs: read by accelerate's own classes, so a wrong key or value fails here, not on the cluster.


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path, monkeypatch):
    import accelerate.utils.launch as launch_utils
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys and bad enum values fail here
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for key in config.fsdp_config:
        assert key in known, f"{path.name}: fsdp_config.{key} is not an accelerate launch option"
    for key in config.deepspeed_config:
        assert key in known, f"{path.name}: deepspeed_config.{key} is not an accelerate launch option"
    args = parser.parse_args(["--config_file", str(path), "-m", "deepen", "train"])
    _validate_launch_command(args)
    assert config.mixed_precision == "bf16"
    kind = config.distributed_type.value
    if path.name == "one-gpu.yaml":
        assert kind == "NO" and config.num_processes == 1
    elif kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3 and config.num_processes == 8
    else:
        assert kind == "FSDP"
        assert (config.num_machines, config.num_processes) == ((2, 16) if "two-node" in path.name else (1, 8))
        monkeypatch.setattr(launch_utils, "is_port_in_use", lambda port: False)
        env = launch_utils.prepare_multi_gpu_env(args)
        for key, value in env.items():
            if key.startswith(("FSDP_", "ACCELERATE_")):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()  # reads and checks the FSDP_* variables the launcher sets
        assert plugin.fsdp_version == 2 and plugin.activation_checkpointing and plugin.cpu_ram_efficient_loading
        for config_cls, layer_cls in ((T.LlamaConfig, T.models.llama.modeling_llama.LlamaDecoderLayer),
                                      (T.MistralConfig, T.models.mistral.modeling_mistral.MistralDecoderLayer)):
            with torch.device("meta"):
                model = T.AutoModelForCausalLM.from_config(config_cls(
                    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128))
            policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
            wrapped = [m for m in model.modules() if policy(m)]
            assert len(wrapped) == 2 and all(isinstance(m, layer_cls) for m in wrapped)


def test_slurm_script_launches_one_accelerate_per_machine():
    """Run the sbatch script with srun, scontrol and accelerate replaced by exported bash functions that print
    what they get (functions, not stub files: nothing to exec, so no race with other test processes)."""
    stubs = {
        "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\n"',
        "srun": 'shift; for rank in 0 1; do SLURM_PROCID=$rank "$@"; done',  # drop --kill-on-bad-exit
        "accelerate": 'echo "accelerate $*"',
    }
    env = {**os.environ, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "VENV": "no-such-venv",
           **{f"BASH_FUNC_{name}%%": f"() {{ {body}; }}" for name, body in stubs.items()}}
    out = subprocess.run(["bash", "scripts/slurm/launch.sh", "train.lr=1e-4"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("accelerate")]
    common = ("accelerate launch --config_file configs/accelerate/two-node.yaml --num_machines 2 "
              "--num_processes 16 --machine_rank {} --main_process_ip gpu-node-07 --main_process_port 29500 "
              "-m deepen train --config configs/llama2-7b-pro.yaml train.lr=1e-4")
    assert lines == [common.format(0), common.format(1)]


# ---------------------------------------------------------------------------------------------------------------
# Memory: the planner against a measured training step, and FSDP2's gradient accumulation.


def _bench_memory():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method, accumulation", [("llama-pro", 1), ("full", 2)])
def test_measured_peak_memory_matches_the_plan(method, accumulation, tmp_path):
    """The live tensor bytes of a real fp32 training step (torch.profiler's memory timeline, as in
    benchmarks/bench_memory.py) against the planner's total for the same config: within 15%."""
    base = tiny_llama(layers=4)
    base.save_pretrained(tmp_path / "base")
    from deepen.data import tiny_tokenizer

    tiny_tokenizer(512).save_pretrained(tmp_path / "base")
    run = run_config(f"model={tmp_path / 'base'}", "grow={method: llama-pro, groups: 2}", f"method={method}",
                     "data.seq_len=64", "train.micro_batch=4", f"train.global_batch={4 * accumulation}")
    measured = _bench_memory().measure(run, method)
    predicted = B.budget(run, gpus=1, strategy="ddp").memory_total
    assert measured["accumulation"] == accumulation
    print(f"{method}, {accumulation} micro-batch(es): measured / predicted = {measured['peak'] / predicted:.3f}")
    assert measured["peak"] / predicted == pytest.approx(1, abs=0.15), (measured, predicted)


def test_logits_peak_is_the_kept_log_softmax_and_two_fp32_vocabulary_gradients():
    shape = B.shape_of(load_config(LLAMA_PRO))
    for act_bytes in (2, 4):
        assert B.activation_bytes(shape, True, act_bytes)["logits"] == 12 * 32000


def test_a_chunked_loss_holds_the_logits_of_one_chunk():
    whole = B.budget(LLAMA_PRO, gpus=8)  # micro-batch 4 x 4096 tokens
    chunked = B.budget(load_config(LLAMA_PRO, ["train.loss_chunk=2048"]), gpus=8)
    assert whole.memory["logits"] == 4 * 4096 * 12 * 32000 and chunked.memory["logits"] == 2048 * 12 * 32000
    assert chunked.memory_total < whole.memory_total and chunked.memory["activations"] == whole.memory["activations"]


def test_fsdp_accumulation_holds_unsharded_gradients():
    """accelerate skips FSDP2's reduce-scatter on all but the last micro-batch: every trainable parameter keeps
    an unsharded bf16 gradient per GPU meanwhile (checked on CPU with fully_shard; see the budget docstring)."""
    eight = B.budget(LLAMA_PRO, gpus=8)  # global 1024 = micro 4 × 32 × 8 GPUs
    assert eight.accumulation == 32 and eight.memory["accumulated gradients"] == 1_619_066_880 * 2
    assert B.budget(LLAMA_PRO, gpus=8, strategy="zero3").memory["accumulated gradients"] == 0
    one = B.budget(LLAMA_PRO, gpus=1)  # FSDP2 on one GPU (the planner's strategy) holds them too
    assert one.memory["accumulated gradients"] == 1_619_066_880 * 2 and one.fits
    assert B.budget(LLAMA_PRO, gpus=1, strategy="ddp").memory["accumulated gradients"] == 0  # one-gpu.yaml
    no_accumulation = load_config(LLAMA_PRO, ["train.global_batch=32"])  # 4 × 8 GPUs: one micro-batch per step
    assert B.budget(no_accumulation, gpus=8).memory["accumulated gradients"] == 0
    full = B.budget(LLAMA_PRO, gpus=8, method="full")
    assert full.memory["accumulated gradients"] == 8_357_482_496 * 2 and full.fits


# Peak memory measured on one NVIDIA H200 on 2026-12-04 by benchmarks/gpu_speed.py (torch.cuda.max_memory_allocated
# over 8 training steps; one GPU, no FSDP, no activation checkpointing; bf16 autocast, fused AdamW), in GiB: the
# planner (strategy ddp) must be within 15% of each.
H200_PEAK_GIB = {("smol", "full"): 25.37, ("smol", "llama-pro"): 18.73, ("smol", "lora"): 22.45,
                 ("1b", "full"): 46.41, ("1b", "llama-pro"): 27.41}


def test_the_planner_is_within_15_percent_of_the_peak_memory_measured_on_an_h200(tmp_path):
    from transformers import LlamaConfig

    from deepen.config import GrowConfig, RunConfig, merged
    from deepen.llama import PRESETS

    shapes = {"smol": (PRESETS["smol"].to_hf(), 6, dict(seq_len=1024, global_batch=64, micro_batch=16)),
              "1b": (LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                 num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False), 4,
                     dict(seq_len=2048, global_batch=32, micro_batch=8))}
    for (shape, method), peak in H200_PEAK_GIB.items():
        hf, groups, batch = shapes[shape]
        hf.save_pretrained(tmp_path / shape)
        run = merged(RunConfig(model=str(tmp_path / shape)), {
            "method": method, "grow": GrowConfig(method="llama-pro", groups=groups) if method == "llama-pro" else None,
            "lora": {"r": 70}, "data": {"seq_len": batch["seq_len"]},
            "train": {"global_batch": batch["global_batch"], "micro_batch": batch["micro_batch"], "precision": "bf16"}})
        planned = B.budget(run, gpus=1, strategy="ddp", checkpointing=False).memory_total
        assert 0.85 <= peak * 2**30 / planned <= 1.15, (shape, method, peak * 2**30 / planned)
