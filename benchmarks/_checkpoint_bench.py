"""What the checkpoint-expansion benchmarks (bench_expand.py, bench_expand_7b.py) share: a random bf16 Llama
checkpoint of a given shape, written to disk shard by shard without holding the model in memory, and
`deepen.checkpoint.expand` run in a fresh child process that reports its time and peak resident memory."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LlamaShape:
    """A Llama checkpoint's shape (untied head, bf16)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_position: int = 2048

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "intermediate_size": self.intermediate, "vocab_size": self.vocab,
            "hidden_act": "silu", "max_position_embeddings": self.max_position, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
        }

    def tensor_shapes(self):
        """(name, shape) of every tensor, in checkpoint order."""
        hidden, inter, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        yield "model.embed_tokens.weight", (self.vocab, hidden)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (hidden,)
            yield p + "self_attn.q_proj.weight", (hidden, hidden)
            yield p + "self_attn.k_proj.weight", (kv, hidden)
            yield p + "self_attn.v_proj.weight", (kv, hidden)
            yield p + "self_attn.o_proj.weight", (hidden, hidden)
            yield p + "post_attention_layernorm.weight", (hidden,)
            yield p + "mlp.gate_proj.weight", (inter, hidden)
            yield p + "mlp.up_proj.weight", (inter, hidden)
            yield p + "mlp.down_proj.weight", (hidden, inter)
        yield "model.norm.weight", (hidden,)
        yield "lm_head.weight", (self.vocab, hidden)

    @property
    def params(self) -> int:
        return sum(numel(s) for _, s in self.tensor_shapes())

    def zeroed_bytes(self, new_layers: int) -> int:
        """The bytes of the o_proj and down_proj of `new_layers` new blocks (bf16): zeros, left as holes."""
        return new_layers * 2 * self.hidden * (self.hidden + self.intermediate)


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


def generate(folder: Path, model: LlamaShape, shard_bytes: int) -> list[int]:
    """Write a random checkpoint of this shape as safetensors shards of at most `shard_bytes`, tensor by tensor,
    each a slice of one random bf16 pool (never the model in memory); returns the shard sizes in bytes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(model.vocab * model.hidden + 4096, generator=gen) * 0.02).to(torch.bfloat16)
    raw = pool.view(torch.int16).numpy()  # the bytes, for file.write
    plan, size = [[]], 0  # which tensors go to which shard
    for name, shape in model.tensor_shapes():
        nbytes = 2 * numel(shape)
        if plan[-1] and size + nbytes > shard_bytes:
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
    (folder / "config.json").write_text(json.dumps(model.config(), indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return [(folder / n).stat().st_size for n in names]


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(apparent size, bytes allocated on disk) of the files in a folder."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files)


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


def expand_in_child(src: Path, out: Path, groups: int) -> dict:
    """Expand src into out by llama_pro(n, groups) in a fresh process: its seconds (os.sync() included), the
    seconds before that sync ("unsynced"), its RSS after imports ("baseline") and its peak RSS ("peak"), bytes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(groups)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
