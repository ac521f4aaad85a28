"""The GPU benchmarks (benchmarks/gpu_*.py, `make bench-gpu`): they exit 0 with a message where there is no CUDA
device, their card table and 1B shape are what they claim, and (slow) they run end to end on CPU with --smoke."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("gpu_*.py"))


def load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*_*.py")), ids=lambda p: p.name)
def test_every_benchmark_takes_smoke_which_make_bench_smoke_runs(script):
    """`make bench-smoke` (run by CI) runs each benchmarks/bench_*.py and gpu_*.py with --smoke; each says what it
    does in --help."""
    if script.name.startswith("_"):
        return  # a helper module, not a benchmark
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if script.name == "bench_expand.py":  # no argparse: a bad argument is refused with its usage
        assert "--smoke" in (ROOT / "benchmarks" / script.name).read_text()
        return
    assert done.returncode == 0 and "--smoke" in done.stdout, done.stderr[-2000:]
    makefile = (ROOT / "Makefile").read_text()
    assert "benchmarks/bench_*.py benchmarks/gpu_*.py" in makefile and "--smoke" in makefile
    assert "make bench-smoke" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_without_cuda_they_say_so_and_exit_0(script):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device" in done.stdout and "skipped" in done.stdout
    assert "BENCH" not in done.stdout


def test_card_peaks():
    cpt = load("gpu_cpt")
    assert cpt.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert cpt.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert cpt.peak_tflops("NVIDIA H200") == 989.0
    assert cpt.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert cpt.peak_tflops("NVIDIA L40S") == 362.0
    assert cpt.peak_tflops("Some Future GPU") is None
    assert cpt.peak_tflops("Some Future GPU", 100.0) == 100.0
    assert cpt.mfu(1000.0, 1e9, 10.0) == pytest.approx(0.1)  # 1e12 FLOP/s of a 10 TFLOP/s peak
    assert cpt.mfu(1000.0, 1e9, None) is None


def test_median_tokens_per_s_skips_warmup(tmp_path):
    cpt = load("gpu_cpt")
    lines = [{"step": 0, "ppl_general": 1.0}] + [{"step": s, "tokens_per_s": 100.0 * s} for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert cpt.median_tokens_per_s(tmp_path / "metrics.jsonl", 2) == (500.0, 5)


def test_the_1b_shape_and_its_launch_config(tmp_path):
    """~1B parameters (on the meta device: only config.json is written), it fits one 80 GB GPU either way, and the
    one-process FSDP2 launch config is accelerate-valid with the 8-GPU file's settings."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig
    from transformers import LlamaConfig

    from deepen import budget as B

    fsdp = load("gpu_fsdp_1b")
    shape = fsdp.SHAPES["1b"]
    LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["kv_heads"], tie_word_embeddings=False).save_pretrained(tmp_path / "base")
    config = fsdp.run_config(tmp_path / "base", "llama-pro", 20, tmp_path / "out", shape, "bf16")
    pro = B.budget(config, gpus=1, strategy="fsdp", checkpointing=True)
    full = B.budget(config, gpus=1, strategy="fsdp", checkpointing=True, method="full")
    assert pro.params == full.params and 0.95e9 < pro.params < 1.1e9
    assert pro.trainable == 4 * (2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048)  # 4 new blocks
    assert pro.accumulation == full.accumulation == 4 and pro.fits and full.fits
    assert 1.3 < pro.speedup < 1.7

    launch = ClusterConfig.from_yaml_file(str(fsdp.accelerate_config(tmp_path / "fsdp2-1gpu.yaml", cpu=False)))
    eight = yaml.safe_load((ROOT / "configs/accelerate/fsdp2-8gpu.yaml").read_text())
    assert launch.distributed_type.value == "FSDP" and launch.num_processes == 1
    assert launch.fsdp_config == eight["fsdp_config"] and launch.mixed_precision == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_smoke_runs_end_to_end_on_cpu(script):
    """--smoke: a tiny shape, a few steps, both methods, every BENCH line (numbers meaningless on CPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--smoke", "--steps", "4", "--warmup", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    bench = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("BENCH")]
    assert all(line.endswith(" on cpu") for line in done.stdout.splitlines() if line.startswith("BENCH"))
    expected = {"gpu_cpt.py": ["gpu_cpt_speedup_llama_pro_over_full", "gpu_cpt_memory_measured_over_predicted_full"],
                "gpu_fsdp_1b.py": ["gpu_fsdp_1b_speedup_llama_pro_over_full", "gpu_fsdp_1b_hfu_full"],
                "gpu_speed.py": ["gpu_speed_smol_llama_pro_over_grown_full", "gpu_speed_1b_llama_pro_over_full",
                                 "gpu_speed_smol_full_compiled_over_eager"],
                "gpu_trainer.py": ["gpu_trainer_deepen_over_trainer"]}[script.name]
    assert set(expected) <= set(bench), bench


def test_a_bare_machine_needs_no_english_text_or_trained_tokenizer(monkeypatch):
    import deepen.data

    def offline(*args, **kwargs):
        raise RuntimeError("the English text is not here")

    cpt = load("gpu_cpt")
    monkeypatch.setattr(deepen.data, "load_corpus", offline)
    assert cpt.general_corpus() == "math"
    tokenizer = load("gpu_fsdp_1b").byte_tokenizer()
    assert len(tokenizer) == 259 and tokenizer.eos_token_id is not None
    assert tokenizer.decode(tokenizer("def f(x):  # é")["input_ids"]) == "def f(x):  # é"
