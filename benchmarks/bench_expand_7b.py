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
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkpoint_bench  # noqa: E402
from _checkpoint_bench import LlamaShape, expand_in_child, folder_bytes  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 4096, 32, 32, 32, 11008, 32000
GROUPS = 8
SHARD_BYTES = 10 * 10**9  # the published Llama-2-7b-hf checkpoint: model-00001-of-00002 (9.98 GB) + 3.5 GB
GIB, MIB = 2**30, 2**20
BOUND_MIB = 256  # "a few MiB": the copy buffer is 64 MiB at most; anything near a tensor's size would be a leak


def model() -> LlamaShape:
    """Llama-2-7B's shape, from the constants above as they are when called (a test shrinks them)."""
    return LlamaShape(HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, max_position=4096)


def generate(folder: Path) -> list[int]:
    """Write the random checkpoint, shards of at most SHARD_BYTES, tensor by tensor (never the model in memory);
    returns the shard sizes in bytes."""
    return _checkpoint_bench.generate(folder, model(), SHARD_BYTES)


def check_output(src: Path, out: Path) -> int:
    """Read back a few tensors (one at a time, memory-mapped) and compare with the source; returns how many."""
    from safetensors import safe_open

    from deepen.plan import llama_pro

    plan = llama_pro(LAYERS, groups=GROUPS)

    def weight_map(folder: Path) -> dict[str, str]:  # a sharded folder's index, or its one file's tensors
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        with safe_open(folder / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")

    src_map, out_map = weight_map(src), weight_map(out)

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
    parser.add_argument("--smoke", action="store_true", help="the same 32 -> 40 layers at a tiny width (seconds): "
                                                             "checks the script end to end")
    args = parser.parse_args()
    if args.smoke:
        global HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, SHARD_BYTES
        HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, SHARD_BYTES = 64, 4, 4, 128, 256, 10**6
    params = model().params
    assert args.smoke or params == 6_738_415_616, params  # Llama-2-7B, exactly
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
        r = expand_in_child(src, out, GROUPS)
        apparent, allocated = folder_bytes(out)
        zeros = model().zeroed_bytes(GROUPS)  # o_proj + down_proj of each new layer, bf16
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
