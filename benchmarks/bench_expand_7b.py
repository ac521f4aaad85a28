"""Benchmark: streaming expansion of a Llama-2-7B-shaped checkpoint, LLaMA Pro 32 -> 40 layers.

A random bf16 checkpoint with Llama-2-7B's exact shape (hidden 4096, 32 layers, 32 heads, intermediate 11008,
vocab 32000, untied head: 6,738,415,616 parameters, 13.5 GB) is written to a temporary folder on disk as two
safetensors shards laid out like the published `meta-llama/Llama-2-7b-hf` (shards of at most 10 GB). It is
written tensor by tensor from one random pool (about 0.26 GB), so the model is never held in memory. Then
`deepen.checkpoint.expand(src, out, llama_pro(32, groups=8))` runs in a fresh child process, so that its peak
resident memory (VmHWM) is the expansion's alone; the time includes os.sync() (the data is on disk).
Last, a few output tensors are read back and checked: the new blocks' o_proj and down_proj are zeros, their
other weights and the copied originals equal their sources byte for byte. Everything is deleted at the end.

Needs about 33 GB of free disk (13.5 GB in, 16.7 GB out of which 1 GB of zeros are holes; it skips with a message
when there is less) and a few minutes (about 2 on a 2-core machine with ~370 MB/s disk writes).

    python benchmarks/bench_expand_7b.py [--dir DIR]   # DIR: where to put the temporary folder (default: $TMPDIR)

Prints
    BENCH expand_7b_seconds <s> s
    BENCH expand_7b_peak_rss_gib <GiB> GiB               the child's whole peak RSS (Python and torch imported)
    BENCH expand_7b_rss_growth_mib <MiB> MiB             peak minus the RSS after imports: what expanding added;
                                                         deepen.checkpoint promises "a few MiB whatever the
                                                         model's size" (bound checked here: <= 256 MiB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 4096, 32, 32, 32, 11008, 32000
GROUPS = 8
SHARD_BYTES = 10 * 10**9  # the published Llama-2-7b-hf checkpoint: model-00001-of-00002 (9.98 GB) + 3.5 GB
GIB, MIB = 2**30, 2**20
BOUND_MIB = 256  # "a few MiB": the copy buffer is 64 MiB at most; anything near a tensor's size would be a leak

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE,
    "vocab_size": VOCAB, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
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
try:  # VmHWM: the peak RSS of this process image
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


def numel(shape) -> int:
    return torch.Size(shape).numel()


def header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """A safetensors header for bf16 tensors laid out contiguously in this order (padded to 8 bytes)."""
    head: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in entries:
        head[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + 2 * numel(shape)]}
        pos += 2 * numel(shape)
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def pool_start(k: int, n: int, pool_size: int) -> int:
    return (k * 7919) % (pool_size - n + 1)  # different bytes in different tensors


def generate(folder: Path) -> list[int]:
    """Write the random checkpoint tensor by tensor, each a slice of one random bf16 pool (never the model in
    memory); returns the shard sizes in bytes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(VOCAB * HIDDEN + 4096, generator=gen) * 0.02).to(torch.bfloat16)
    raw = pool.view(torch.int16).numpy()  # the bytes, for file.write
    shapes = list(tensor_shapes())
    plan, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * numel(shape)
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map, total, k = {}, 0, 0
    for name, entries in zip(names, plan):
        with open(folder / name, "wb") as f:
            f.write(header(entries))
            for tensor, shape in entries:
                n = numel(shape)
                start = pool_start(k, n, pool.numel())
                f.write(raw[start:start + n].tobytes())
                k += 1
                weight_map[tensor] = name
                total += 2 * n
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return [(folder / n).stat().st_size for n in names]


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(apparent size, bytes allocated on disk) of the files in a folder."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


def check_output(src: Path, out: Path) -> int:
    """Read back a few tensors (one at a time, memory-mapped) and compare with the source; returns how many."""
    from safetensors import safe_open

    from deepen.plan import llama_pro

    plan = llama_pro(LAYERS, groups=GROUPS)
    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    out_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    def get(folder, weight_map, name):
        with safe_open(folder / weight_map[name], "pt") as f:
            return f.get_tensor(name)

    checked = 0
    new = plan.new_layers
    assert new == [4, 9, 14, 19, 24, 29, 34, 39], new
    for i in (new[0], new[3], new[-1]):  # new blocks: zeroed outputs, the rest copied from their source
        source = plan.layers[i].source
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            t = get(out, out_map, f"model.layers.{i}.{module}.weight")
            assert t.dtype == torch.bfloat16 and not t.any(), f"layer {i} {module} is not all zeros"
            checked += 1
        for module in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm"):
            a = get(out, out_map, f"model.layers.{i}.{module}.weight")
            b = get(src, src_map, f"model.layers.{source}.{module}.weight")
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"layer {i} {module} != base {source}"
            checked += 1
    for i in (0, 5, 38):  # originals, renumbered: 5 <- 4, 38 <- 31 (the last original, before the last copy)
        source = plan.layers[i].source
        for module in ("self_attn.o_proj", "mlp.down_proj", "mlp.gate_proj"):
            a = get(out, out_map, f"model.layers.{i}.{module}.weight")
            b = get(src, src_map, f"model.layers.{source}.{module}.weight")
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"layer {i} {module} != base {source}"
            checked += 1
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(get(out, out_map, name).view(torch.int16), get(src, src_map, name).view(torch.int16))
        checked += 1
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS + GROUPS
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to create the temporary folder (default: the system's temp dir)")
    args = parser.parse_args()
    params = sum(numel(s) for _, s in tensor_shapes())
    assert params == 6_738_415_616, params  # Llama-2-7B, exactly
    need = 2 * params * (1 + (LAYERS + GROUPS) / LAYERS) + 2 * GIB  # in, out (holes aside), and a margin
    base_dir = args.dir or tempfile.gettempdir()
    free = shutil.disk_usage(base_dir).free
    if free < need:  # not a failure of the code under test: say so and let `make bench` go on
        print(f"bench_expand_7b skipped: it needs about {need / 1e9:.0f} GB free in {base_dir}, which has "
              f"{free / 1e9:.0f} GB; pass --dir on a disk with room")
        return
    root = Path(tempfile.mkdtemp(prefix="deepen-bench-expand-7b-", dir=base_dir))
    try:
        t = time.perf_counter()
        src = root / "llama-2-7b"
        shards = generate(src)
        os.sync()
        print(f"checkpoint: {params:,} params bf16, {len(shards)} shards, {sum(shards) / 1e9:.2f} GB, largest "
              f"{max(shards) / 1e9:.2f} GB (generated and synced in {time.perf_counter() - t:.1f} s)", flush=True)
        out = root / "llama-pro-8.3b"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(GROUPS)], env=env, check=True,
                              capture_output=True, text=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        apparent, allocated = folder_bytes(out)
        zeros = GROUPS * 2 * HIDDEN * (HIDDEN + INTERMEDIATE)  # o_proj + down_proj of each new layer, bf16
        t = time.perf_counter()
        checked = check_output(src, out)
        growth = (r["peak"] - r["baseline"]) / MIB
        print(f"expand llama_pro({LAYERS}, groups={GROUPS}) -> {LAYERS + GROUPS} layers: {r['seconds']:.1f} s "
              f"({r['unsynced']:.1f} s before os.sync); output {apparent / 1e9:.2f} GB apparent, "
              f"{allocated / 1e9:.2f} GB allocated ({zeros / 1e9:.2f} GB of zeros left as holes); "
              f"{apparent / GIB / r['seconds']:.2f} GiB/s of output")
        print(f"checked {checked} output tensors against the source in {time.perf_counter() - t:.1f} s: new blocks' "
              f"o_proj/down_proj zero, copies and originals byte-equal")
        print(f"expand child RSS: {r['baseline'] / GIB:.3f} GiB after imports, peak {r['peak'] / GIB:.3f} GiB "
              f"(+{growth:.0f} MiB while expanding; bound {BOUND_MIB} MiB; the largest input shard is "
              f"{max(shards) / GIB:.2f} GiB)")
        print(f"BENCH expand_7b_seconds {r['seconds']:.1f} s")
        print(f"BENCH expand_7b_peak_rss_gib {r['peak'] / GIB:.3f} GiB")
        print(f"BENCH expand_7b_rss_growth_mib {growth:.0f} MiB")
        if growth > BOUND_MIB:
            sys.exit(f"expanding added {growth:.0f} MiB of resident memory, over the {BOUND_MIB} MiB bound")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
