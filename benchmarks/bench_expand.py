"""Benchmark: streaming `deepen.checkpoint.expand` against a plain copy of the same checkpoint folder.

A random ~1.1B-parameter bf16 checkpoint with TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000, untied) is written as sharded safetensors (shards <= 1 GB) under a temporary
folder, then copied with shutil.copytree and expanded with llama_pro(22, groups=11) -> 33 layers, in alternating
order, three times each; the medians are compared. Each timing starts after os.sync() and ends after os.sync(), so
that neither pays for the other's write-back and neither hides its own in the page cache. Each expansion runs
in a fresh child process so that its peak resident memory (VmHWM) is the expansion's alone, not the
generator's.

Prints
    BENCH expand_time_over_copy <ratio> x                  goal <= 2
    BENCH expand_peak_rss_over_shard <GiB> GiB             goal <= 1: the child's whole peak RSS (Python, torch
                                                           and all) minus the largest input shard
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 2048, 22, 32, 4, 5632, 32000
SHARD_BYTES = 10**9
GROUPS = 11
GIB = 2**30

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE,
    "vocab_size": VOCAB, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
}

# The child: import first (that memory is the baseline), then expand and report time and peak RSS.
CHILD = """
import json, os, resource, sys, time
import psutil
from deepen.checkpoint import expand
from deepen.plan import llama_pro
src, out, groups = sys.argv[1], sys.argv[2], int(sys.argv[3])
baseline = psutil.Process().memory_info().rss
os.sync()
t = time.perf_counter()
expand(src, out, lambda n: llama_pro(n, groups=groups), progress=False)
unsynced = time.perf_counter() - t
os.sync()
seconds = time.perf_counter() - t
try:  # VmHWM: the peak RSS of this process image (ru_maxrss would also count the parent's, inherited at fork+exec)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"seconds": seconds, "unsynced": unsynced, "baseline": baseline, "peak": peak}))
"""


def tensor_shapes():
    kv = HIDDEN // HEADS * KV_HEADS
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)
        yield p + "self_attn.k_proj.weight", (kv, HIDDEN)
        yield p + "self_attn.v_proj.weight", (kv, HIDDEN)
        yield p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        yield p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def generate(folder: Path) -> list[int]:
    """Write the random checkpoint shard by shard (at most one shard of tensors in memory at a time, cut from one
    random pool); returns the shard sizes in bytes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(VOCAB * HIDDEN + 4096, generator=gen) * 0.02).to(torch.bfloat16)
    shapes = list(tensor_shapes())
    plan, size = [[]], 0  # which tensors go to which shard
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map, total, k = {}, 0, 0
    for name, entries in zip(names, plan):
        tensors = {}
        for tensor, shape in entries:
            n = torch.Size(shape).numel()
            start = (k * 7919) % (pool.numel() - n + 1)  # different bytes in different tensors
            tensors[tensor] = pool[start:start + n].clone().view(shape)
            k += 1
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return [(folder / n).stat().st_size for n in names]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm_read(folder: Path) -> None:
    for p in sorted(folder.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 * 2**20):
                pass


def time_copy(src: Path, dst: Path) -> dict:
    os.sync()
    t = time.perf_counter()
    shutil.copytree(src, dst)
    unsynced = time.perf_counter() - t
    os.sync()
    seconds = time.perf_counter() - t
    shutil.rmtree(dst)
    return {"seconds": seconds, "unsynced": unsynced}


def run_expand(src: Path, dst: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(GROUPS)], env=env, check=True,
                          capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["out_bytes"] = folder_bytes(dst)
    shutil.rmtree(dst)
    return result


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="deepen-bench-expand-"))
    try:
        t = time.perf_counter()
        src = root / "base"
        shards = generate(src)
        params = sum(torch.Size(s).numel() for _, s in tensor_shapes())
        print(f"checkpoint: {params / 1e9:.3f}B params bf16, {len(shards)} shards, {sum(shards) / GIB:.2f} GiB, "
              f"largest shard {max(shards) / GIB:.3f} GiB (generated in {time.perf_counter() - t:.1f} s)")
        warm_read(src)
        copies, expands = [], []
        for order in (("copy", "expand"), ("expand", "copy"), ("copy", "expand")):
            for what in order:
                if what == "copy":
                    copies.append(time_copy(src, root / "copy"))
                else:
                    expands.append(run_expand(src, root / "expanded"))
        copy_s = statistics.median(r["seconds"] for r in copies)
        expand_s = statistics.median(r["seconds"] for r in expands)
        out_bytes = expands[0]["out_bytes"]
        zero_bytes = GROUPS * 2 * HIDDEN * (HIDDEN + INTERMEDIATE)  # o_proj and down_proj of each new layer
        in_bytes = folder_bytes(src)
        peak = max(r["peak"] for r in expands)
        baseline = max(r["baseline"] for r in expands)
        def runs(results):
            return ", ".join(f"{r['seconds']:.2f} ({r['unsynced']:.2f} before sync)" for r in results)

        print(f"copytree: {runs(copies)} s ({in_bytes / GIB:.2f} GiB)")
        print(f"expand llama_pro({LAYERS}, groups={GROUPS}) -> {LAYERS + GROUPS} layers: {runs(expands)} s "
              f"({out_bytes / GIB:.2f} GiB, {zero_bytes / GIB:.2f} GiB of it zeros left as holes)")
        print(f"times include os.sync() (data on disk); medians: copy {copy_s:.2f} s, expand {expand_s:.2f} s")
        print(f"throughput: copy {in_bytes / GIB / copy_s:.2f} GiB/s, expand {out_bytes / GIB / expand_s:.2f} GiB/s "
              f"of output")
        print(f"expand child RSS: {baseline / GIB:.3f} GiB after imports, peak {peak / GIB:.3f} GiB "
              f"(+{(peak - baseline) / 2**20:.0f} MiB while expanding)")
        print(f"BENCH expand_time_over_copy {expand_s / copy_s:.2f} x")
        print(f"BENCH expand_peak_rss_over_shard {(peak - max(shards)) / GIB:.3f} GiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
