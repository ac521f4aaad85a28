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

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkpoint_bench import LlamaShape, expand_in_child, folder_bytes, generate  # noqa: E402

MODEL = LlamaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000)  # TinyLlama's
SHARD_BYTES = 10**9
GROUPS = 11
GIB = 2**30


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
    result = expand_in_child(src, dst, GROUPS)
    result["out_bytes"] = folder_bytes(dst)[0]
    shutil.rmtree(dst)
    return result


def main() -> None:
    global MODEL, SHARD_BYTES
    if "--smoke" in sys.argv[1:]:  # a tiny width, the same 22 -> 33 layers: checks the script end to end (seconds)
        MODEL, SHARD_BYTES = LlamaShape(hidden=64, layers=22, heads=4, kv_heads=2, intermediate=128, vocab=256), 10**6
    elif sys.argv[1:]:
        sys.exit(f"usage: {sys.argv[0]} [--smoke]")
    root = Path(tempfile.mkdtemp(prefix="deepen-bench-expand-"))
    try:
        t = time.perf_counter()
        src = root / "base"
        shards = generate(src, MODEL, SHARD_BYTES)
        params = MODEL.params
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
        zero_bytes = MODEL.zeroed_bytes(GROUPS)  # o_proj and down_proj of each new layer
        in_bytes = folder_bytes(src)[0]
        peak = max(r["peak"] for r in expands)
        baseline = max(r["baseline"] for r in expands)
        def runs(results):
            return ", ".join(f"{r['seconds']:.2f} ({r['unsynced']:.2f} before sync)" for r in results)

        print(f"copytree: {runs(copies)} s ({in_bytes / GIB:.2f} GiB)")
        print(f"expand llama_pro({MODEL.layers}, groups={GROUPS}) -> {MODEL.layers + GROUPS} layers: "
              f"{runs(expands)} s ({out_bytes / GIB:.2f} GiB, {zero_bytes / GIB:.2f} GiB of it zeros left as holes)")
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
