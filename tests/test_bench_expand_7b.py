"""benchmarks/bench_expand_7b.py at a toy width: the same 32 -> 40 plan, the generator, the expansion and the
read-back checks, in a second (the real run writes 13.5 GB and takes minutes: `python benchmarks/bench_expand_7b.py`)."""

import importlib.util
import json
from pathlib import Path

import pytest

from deepen.checkpoint import expand
from deepen.plan import llama_pro

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_expand_7b", ROOT / "benchmarks" / "bench_expand_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, value in dict(HIDDEN=16, HEADS=2, KV_HEADS=2, INTERMEDIATE=24, VOCAB=64, SHARD_BYTES=20_000).items():
        monkeypatch.setattr(module, name, value)
    return module


def test_generate_expand_and_check(bench, tmp_path):
    shards = bench.generate(tmp_path / "base")
    assert len(shards) >= 2  # sharded like the published checkpoint
    weight_map = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(weight_map) == 32 * 9 + 3
    expand(tmp_path / "base", tmp_path / "out", llama_pro(32, groups=8), max_shard_size=50_000, progress=False)
    assert bench.check_output(tmp_path / "base", tmp_path / "out") == 27


def test_check_output_catches_a_wrong_expansion(bench, tmp_path):
    bench.generate(tmp_path / "base")
    # the 8 copies on top instead of after each group: layer 4 is an original, its o_proj not zero
    expand(tmp_path / "base", tmp_path / "out", llama_pro(32, groups=8, placement="top"), max_shard_size=50_000,
           progress=False)
    with pytest.raises(AssertionError, match="layer 4 self_attn.o_proj is not all zeros"):
        bench.check_output(tmp_path / "base", tmp_path / "out")
