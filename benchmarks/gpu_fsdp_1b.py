"""GPU benchmark: continual pretraining of a ~1B-parameter Llama with the FSDP2 set-up of the 8-GPU config, on
one GPU, LLaMA Pro against full fine-tuning; speed, MFU and peak memory against deepen.budget's prediction.

The model: a Llama-2-style shape built in code and randomly initialised (hidden 2048, SwiGLU 5632, 32 heads,
4 KV heads, vocabulary 32000, untied head; TinyLlama's block) with 16 blocks, saved in bf16 to a temporary
folder, then grown by the run config's plan, llama_pro(16, groups=4), to 20 blocks: 1.01B parameters, 4 new
blocks (176M) that LLaMA Pro trains. The tokenizer is byte-level, built in code (259 ids; the model's vocabulary
is larger, as a real 32000-row head costs). The data: the built-in code corpus, sequences of 2048, global batch 32
= 4 micro-batches of 8, bf16.

The launch: `accelerate launch` with configs/accelerate/fsdp2-8gpu.yaml's settings and num_processes 1, so
accelerate's FSDP2 preparation runs as it would on 8 GPUs (one FSDP unit per decoder layer, activation
checkpointing, rank-0 loading, bf16 compute); each method in its own launch (a clean peak counter).

Measured, per method: tokens/s (median of deepen.train's per-step log after `--warmup` steps); MFU (tokens/s ×
the model FLOPs per token deepen.budget counts for this method's work, recomputation excluded, / the card's
dense bf16 peak) and HFU (recomputation included); peak torch.cuda.max_memory_allocated over the training steps
against deepen.budget's prediction for this config on 1 GPU, strategy fsdp, activation checkpointing on.

Prints `BENCH gpu_fsdp_1b_<quantity>_<method> <value> <unit> on <card>`. Without a CUDA device it says so and
exits 0. About 3 minutes on an H100.

    python benchmarks/gpu_fsdp_1b.py [--steps 20] [--warmup 5] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cpt import (GIB, METHODS, ROOT, arguments, bench_line, cuda_or_exit, general_corpus, mfu,  # noqa: E402
                     peak_memory, peak_tflops, reset_peak_memory, run_result)

# (hidden, intermediate, heads, kv_heads, vocab, base layers, groups, seq_len, global batch, micro-batch)
SHAPES = {
    "1b": dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, layers=16, groups=4, seq_len=2048,
               global_batch=32, micro_batch=8),
    "smoke": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=4096, layers=4, groups=2, seq_len=64,
                  global_batch=4, micro_batch=2),
}


def byte_tokenizer():
    """A byte-level tokenizer built in code (256 bytes + <s>, </s>, <pad>; no merges): needs no data or cache,
    and throughput does not depend on which ids the tokens have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "<pad>"], show_progress=False)
    tok.train_from_iterator([], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def base_model(folder: Path, shape: dict) -> Path:
    """The random base model (bf16 safetensors) and a byte-level tokenizer, written to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1B weights: seconds on a GPU
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU to the runs
    return folder


def run_config(base: Path, method: str, steps: int, out: Path, shape: dict, precision: str,
               general: str = "general"):
    from deepen.config import load_config

    return load_config(None, [
        f"model={base}", f"grow={{method: llama-pro, groups: {shape['groups']}}}", f"method={method}",
        "data.domain=code", f"data.general={general}", f"data.seq_len={shape['seq_len']}",
        f"train.steps={steps}", f"train.global_batch={shape['global_batch']}",
        f"train.micro_batch={shape['micro_batch']}", "train.lr=2.0e-4", f"train.precision={precision}",
        f"train.eval_every={steps}", "train.eval_batches=1", f"train.save_every={steps}", f"out={out}"])


def accelerate_config(path: Path, cpu: bool) -> Path:
    """configs/accelerate/fsdp2-8gpu.yaml with one process (on CPU for --smoke: accelerate then runs no FSDP)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs/accelerate/fsdp2-8gpu.yaml").read_text())
    config["num_processes"] = 1
    if cpu:
        config.update(use_cpu=True, mixed_precision="no")
        config.pop("gpu_ids", None)
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(args) -> None:
    """One method's run under accelerate launch; the main process writes out/result.json."""
    import torch
    from accelerate import PartialState
    from torch.distributed.fsdp import FSDPModule

    from deepen.train import train

    shape = SHAPES["smoke" if args.smoke else "1b"]
    config = run_config(Path(args.base), args.child, args.steps, Path(args.out), shape,
                        "fp32" if args.smoke else "bf16", args.general)
    cuda = reset_peak_memory()
    seen = {}

    def callback(record, model):
        if record["step"] == 1:
            seen["fsdp"] = isinstance(model, FSDPModule)
        if record["step"] == args.steps and cuda:  # before the final weights are gathered and saved
            seen.update(peak_memory())

    train(config, progress=False, callback=callback)
    if PartialState().is_main_process:
        card = torch.cuda.get_device_name() if cuda else "cpu"
        (Path(args.out) / "result.json").write_text(json.dumps({"card": card, **seen}))


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], 20, "check the script end to end on any device: a tiny shape, a "
                       "few steps (numbers meaningless; on CPU accelerate runs no FSDP)")
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.smoke and not cuda_or_exit("gpu_fsdp_1b"):
        return

    from deepen.budget import GB, budget

    shape = SHAPES["smoke" if args.smoke else "1b"]
    general = general_corpus()
    accelerate = Path(sys.executable).with_name("accelerate")
    results = {}
    with tempfile.TemporaryDirectory(prefix="deepen-gpu-fsdp-1b-") as tmp:
        base = base_model(Path(tmp, "base"), shape)
        launch = accelerate_config(Path(tmp, "fsdp2-1gpu.yaml"), cpu=args.smoke)
        for method in METHODS:
            out = Path(tmp, method)
            cmd = [str(accelerate), "launch", "--config_file", str(launch), "--main_process_port", str(free_port()),
                   __file__, "--child", method, "--base", str(base), "--out", str(out), "--steps", str(args.steps),
                   "--general", general]
            done = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            results[method] = run_result("gpu_fsdp_1b", method, done, out, args.warmup)
        config = run_config(base, "llama-pro", args.steps, Path(tmp, "unused"), shape,
                            "fp32" if args.smoke else "bf16")
        budgets = {m: budget(config, gpus=1, strategy="fsdp", checkpointing=True, method=m) for m in METHODS}

    card = results[METHODS[0]]["card"]
    peak = peak_tflops(card, args.peak_tflops)
    b0 = budgets[METHODS[0]]
    print(f"{card}: dense bf16 peak {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s; {b0.model}: "
          f"{b0.params:,} parameters; {args.steps} steps of {shape['global_batch']} × {shape['seq_len']} tokens "
          f"(micro-batch {shape['micro_batch']}), FSDP2 on 1 process with activation checkpointing, median of "
          f"{results[METHODS[0]]['steps_timed']} steps")
    for method in METHODS:
        r, b = results[method], budgets[method]
        allocated, predicted = r.get("allocated"), b.memory_total
        print(f"{method}: {b.trainable:,} trainable; FSDP2 {'on' if r.get('fsdp') else 'OFF'}; "
              f"{b.flops.model / 1e9:.2f} GFLOP/token model, {b.flops.hardware / 1e9:.2f} with recomputation "
              f"(deepen.budget); {r['tokens_per_s']:,.0f} tokens/s; peak allocated "
              f"{allocated / GIB if allocated else float('nan'):.2f} GiB, predicted {predicted / GB:.2f} GB = "
              + ", ".join(f"{k} {v / GB:.2f}" for k, v in b.memory.items() if v))
        print(bench_line(f"gpu_fsdp_1b_tokens_per_s_{method}", r["tokens_per_s"], "tokens/s", card, ".0f"))
        print(bench_line(f"gpu_fsdp_1b_mfu_{method}", mfu(r["tokens_per_s"], b.flops.model, peak), "of-peak", card))
        print(bench_line(f"gpu_fsdp_1b_hfu_{method}", mfu(r["tokens_per_s"], b.flops.hardware, peak), "of-peak",
                         card))
        print(bench_line(f"gpu_fsdp_1b_peak_memory_{method}", allocated / GIB if allocated else None, "GiB", card,
                         ".2f"))
        print(bench_line(f"gpu_fsdp_1b_memory_measured_over_predicted_{method}",
                         allocated / predicted if allocated else None, "x", card))
    print(f"LLaMA Pro over full: predicted {budgets['llama-pro'].speedup:.2f}x by model FLOPs")
    print(bench_line("gpu_fsdp_1b_speedup_llama_pro_over_full",
                     results["llama-pro"]["tokens_per_s"] / results["full"]["tokens_per_s"], "x", card, ".2f"))


if __name__ == "__main__":
    main()
