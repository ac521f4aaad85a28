"""Faults and bad input, as a user meets them: every case ends with one clear line on stderr and a non-zero exit
(no traceback), nothing half-written is left behind — after an error, Ctrl-C, SIGTERM or SIGKILL — and nothing is
unpickled from a run folder. Kills hit `deepen expand` at chosen points: a child process pauses there (a patched
function writes a marker file and sleeps) while the test sends the signal."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from deepen.cli import main
from deepen.config import load_config
from deepen.manifest import atomic_folder, sweep_stale
from deepen.rundir import CHECKPOINTS
from deepen.train import train

REPO = Path(__file__).resolve().parents[1]


def llama(path: Path, hidden=64, layers=4, vocab=128, seed=0) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                 max_position_embeddings=64)).save_pretrained(path)
    return path


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("deepen ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


def beside(out: Path) -> list[str]:
    """What lies beside OUT that a write into it left: temporary folders named after it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---------------------------------------------------------------------------------------------- killing `deepen expand`

# The child pauses at one point of `deepen expand`: "shard" (inside the first shard, after its first chunk),
# "middle" (after 20 tensors), "rename" (everything written, just before the first rename into place), "swap"
# (--overwrite: the old OUT set aside, the new one not renamed in yet).
CHILD = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import deepen.checkpoint as checkpoint
    point, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    calls = {"copy": 0}

    def pause():
        marker.write_text(str(os.getpid()))
        time.sleep(60)

    copy = checkpoint._Copier.copy
    def paused_copy(self, *args, **kwargs):
        copy(self, *args, **kwargs)
        calls["copy"] += 1
        if point == "shard" and calls["copy"] == 1 or point == "middle" and calls["copy"] == 20:
            pause()
    checkpoint._Copier.copy = paused_copy

    replace = os.replace
    def paused_replace(src, dst, *args, **kwargs):
        first = str(src).endswith(".partial") or str(dst).endswith(".old")  # the first rename of the commit
        if point == "rename" and first or point == "swap" and str(src).endswith(".partial") \
                and any(Path(dst).parent.glob(".*.old")):  # the new one in, once the old one is aside
            pause()
        return replace(src, dst, *args, **kwargs)
    os.replace = paused_replace

    from deepen.cli import main
    sys.exit(main(argv))
''')


def expand_until(tmp_path: Path, point: str, src: Path, out: Path, *extra: str) -> subprocess.Popen:
    """Start `deepen expand SRC OUT` in a child that pauses at `point`; return it once it is there."""
    (tmp_path / "child.py").write_text(CHILD)
    marker = tmp_path / f"at-{point}"
    marker.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), point, str(marker), "expand", str(src),
                              str(out), "--method", "llama-pro", "--groups", "2", "--max-shard-size", "20MB", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not marker.exists():
        assert child.poll() is None, child.communicate()
        assert time.time() < deadline, "the child never reached the point"
        time.sleep(0.05)
    return child


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A Llama checkpoint of about 100 MB (hidden 512, 8 layers, fp32), in shards."""
    path = tmp_path_factory.mktemp("big") / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=8192)).save_pretrained(path, max_shard_size="40MB")
    return path


def test_sigterm_while_expanding_leaves_nothing(tmp_path):
    src = llama(tmp_path / "base", hidden=256, layers=4, vocab=4096)  # about 15 MB: fast
    out = tmp_path / "out"
    child = expand_until(tmp_path, "middle", src, out)
    assert beside(out)  # its temporary folder is there while it writes
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143
    one_line_error(err, "terminated (SIGTERM)", "nothing half-written")
    assert not out.exists() and beside(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["shard", "middle", "rename"])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_expand_leaves_nothing_after_the_next_run(big, tmp_path, point, how, capfd):
    out = tmp_path / "out"
    child = expand_until(tmp_path, point, big, out)
    child.send_signal(getattr(signal, how))
    _, err = child.communicate(timeout=60)
    if how == "SIGKILL":
        assert child.returncode == -signal.SIGKILL and beside(out)  # no chance to clean up: a .partial stays
    else:
        assert child.returncode == {"SIGTERM": 143, "SIGINT": 130}[how]
        one_line_error(err, "nothing half-written")
        assert beside(out) == []
    assert not out.exists()
    assert main(["expand", str(big), str(out), "--method", "llama-pro", "--groups", "2"]) == 0  # the next run
    assert beside(out) == []
    if how == "SIGKILL":
        assert "removed .out." in capfd.readouterr().err  # it says what it swept, with its size
    assert main(["verify", str(big), str(out)]) == 0  # and its output is right: exactly the base's function


@pytest.mark.slow
def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(big, tmp_path):
    out = tmp_path / "out"
    assert main(["expand", str(big), str(out), "--method", "llama-pro", "--groups", "4"]) == 0
    (out / "mine.txt").write_text("the old output")
    child = expand_until(tmp_path, "rename", big, out, "--overwrite")
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    assert (out / "mine.txt").read_text() == "the old output"  # killed before the swap: the old OUT is whole
    child = expand_until(tmp_path, "swap", big, out, "--overwrite")
    assert not out.exists()  # the old OUT is aside for an instant
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=60)
    # the next run puts the old OUT back (and so refuses to overwrite it without --overwrite)
    assert main(["expand", str(big), str(out), "--method", "llama-pro", "--groups", "2"]) == 2
    assert (out / "mine.txt").read_text() == "the old output" and beside(out) == []
    assert main(["expand", str(big), str(out), "--method", "llama-pro", "--groups", "2", "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and beside(out) == []
    assert json.loads((out / "expansion.json").read_text())["plan"]["args"]["groups"] == 2


def test_an_interrupted_swap_is_put_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    replace, calls = os.replace, []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "mine.txt").read_text() == "old" and not (out / "new.txt").exists() and beside(out) == []
    # killed between the two renames (the old OUT aside, the new one not in yet): the next write puts it back
    aside = tmp_path / f".out.{2**22 + 7}@{__import__('deepen.manifest').manifest._host()}.x.old"
    os.replace(out, aside)
    assert sweep_stale(out, say=lambda line: None) == [] and (out / "mine.txt").read_text() == "old"


# ---------------------------------------------------------------------------------------------- expand: bad input


def test_expand_into_its_own_source_or_onto_a_file_is_refused(tmp_path, capsys):
    src = llama(tmp_path / "base")
    for out in (src, src / "grown"):
        assert main(["expand", str(src), str(out), "--method", "llama-pro", "--groups", "2", "--overwrite"]) == 2
        one_line_error(capsys.readouterr().err, "would replace the base")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    (tmp_path / "file").write_text("x")
    assert main(["expand", str(src), str(tmp_path / "file"), "--method", "llama-pro", "--groups", "2",
                 "--overwrite"]) == 2
    one_line_error(capsys.readouterr().err, "is a file, not a folder")


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    src = llama(tmp_path / "base")
    out = tmp_path / "out"
    import deepen.checkpoint as checkpoint

    def full(fd, data):
        raise OSError(28, "No space left on device", str(out))

    monkeypatch.setattr(checkpoint, "write_all", full)
    assert main(["expand", str(src), str(out), "--method", "llama-pro", "--groups", "2"]) == 1
    one_line_error(capsys.readouterr().err, "no space left on the device", "nothing half-written")
    assert not out.exists() and beside(out) == []


@pytest.mark.slow
def test_disk_full_on_a_small_filesystem(tmp_path, capsys):
    """A real full disk: a 4 MB tmpfs (needs the right to mount; skipped with the reason otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        src = llama(tmp_path / "base", hidden=256, layers=4, vocab=4096)  # about 15 MB: does not fit in 4 MB
        assert main(["expand", str(src), str(mount / "out"), "--method", "llama-pro", "--groups", "2"]) == 1
        one_line_error(capsys.readouterr().err, "no space left on the device")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    import deepen.checkpoint as checkpoint

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_all", interrupt)
    out = tmp_path / "out"
    assert main(["expand", str(llama(tmp_path / "base")), str(out), "--method", "llama-pro", "--groups", "2"]) == 130
    one_line_error(capsys.readouterr().err, "interrupted (Ctrl-C)")
    assert beside(out) == []


# ---------------------------------------------------------------------------------------------- training


def run_config(base, out, *overrides):
    return load_config(None, [f"model={base}", "grow={method: llama-pro, groups: 2}", "data.seq_len=32",
                              "data.max_tokens=4096", "train.steps=4", "train.global_batch=2", "train.micro_batch=2",
                              "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", f"out={out}",
                              *overrides])


class Stop(Exception):
    pass


class Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


def test_resume_never_unpickles_what_is_in_the_run_folder(small_llama_path, tmp_path):
    def stop(record, model):
        if record["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        train(run_config(small_llama_path, tmp_path / "run"), progress=False, callback=stop)
    step = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    proof = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "pytorch_model.bin"):  # what accelerate's save_state would write, and load with pickle
        (step / name).write_bytes(pickle.dumps(Payload(proof)))
    train(run_config(small_llama_path, tmp_path / "run"), progress=False)
    assert not proof.exists()


def test_a_nan_loss_says_how_to_resume_with_a_lower_learning_rate(small_llama_path, tmp_path, capsys):
    def poison(record, model):
        if record["step"] == 2:
            with torch.no_grad():
                model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))

    config = run_config(small_llama_path, tmp_path / "run", "train.lr=1e-2")
    with pytest.raises(FloatingPointError) as e:
        train(config, progress=False, callback=poison)
    message = str(e.value)
    assert "loss is nan at step 3" in message and "step-0000002" in message
    assert "train.lr=0.001 --allow-change train.lr" in message and "fp32" not in message  # the run is fp32
    with pytest.raises(ValueError, match=r"add --allow-change train.lr"):  # the advice, without the flag
        train(run_config(small_llama_path, tmp_path / "run", "train.lr=1e-3"), progress=False)
    out = train(run_config(small_llama_path, tmp_path / "run", "train.lr=1e-3"), progress=False,
                allow_change=["train.lr"])  # the advice, followed
    records = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    changed = [r for r in records if "changed_on_resume" in r]
    assert [(r["step"], r["changed_on_resume"]) for r in changed] == [(2, {"train.lr": [0.01, 0.001]})]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in steps)
    assert steps[2]["lr"] < 1e-3  # the schedule goes on from step 2, scaled to the new peak
    bf16 = run_config(small_llama_path, tmp_path / "bf16", "train.precision=bf16")
    with pytest.raises(FloatingPointError, match="or train.precision=fp32"):
        train(bf16, progress=False, callback=poison)
    with pytest.raises(ValueError, match="only train.lr, train.clip"):
        train(run_config(small_llama_path, tmp_path / "run"), progress=False, allow_change=["train.steps"])


def test_config_that_does_not_parse_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    one_line_error(capsys.readouterr().err, f"config {bad} is not valid YAML", "line")
    assert main(["train", "--config", "configs/tiny-cpu.yaml", "train.steps=[1"]) == 2
    one_line_error(capsys.readouterr().err, "cannot read the value of the override 'train.steps=[1'")
    assert main(["budget", "--config", str(bad)]) == 2
    one_line_error(capsys.readouterr().err, "is not valid YAML")


# ---------------------------------------------------------------------------------------------- verify, eval, grade


def test_verify_refuses_models_it_cannot_compare(tmp_path, capsys):
    a = llama(tmp_path / "a", vocab=128)
    b = llama(tmp_path / "b", vocab=256)
    assert main(["verify", str(a), str(b)]) == 2
    one_line_error(capsys.readouterr().err, "different vocabularies (128 and 256 tokens)")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "qwen")
    assert main(["verify", str(a), str(tmp_path / "qwen")]) == 2
    one_line_error(capsys.readouterr().err, "different families (llama and qwen2)")
    for missing in (tmp_path / "nowhere", "runs/nowhere/at-all"):
        assert main(["verify", str(a), str(missing)]) == 2
        one_line_error(capsys.readouterr().err, f"GROWN {missing}: not a model folder")


def test_verify_a_qwen2_folder_without_tokenizer_files(tmp_path, capsys):
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "qwen")
    assert main(["expand", str(tmp_path / "qwen"), str(tmp_path / "grown"), "--method", "llama-pro",
                 "--groups", "2"]) == 0
    assert main(["verify", str(tmp_path / "qwen"), str(tmp_path / "grown")]) == 0  # seeded random ids instead
    assert "EXACT" in capsys.readouterr().out


def test_eval_of_a_missing_model_or_an_offline_hub_corpus_is_one_line(small_llama_path, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    one_line_error(capsys.readouterr().err, "not a model folder")
    assert main(["eval", str(small_llama_path), "--data", "EleutherAI/proof-pile-2", "--seq-len", "32"]) == 2
    one_line_error(capsys.readouterr().err, "hub dataset", "HF_HUB_OFFLINE")


def test_grade_a_notebook_that_answers_no_lab_is_an_error(tmp_path, capsys):
    assert main(["grade", str(REPO / "notebooks" / "02_zero_init_expansion_is_identity.ipynb"),
                 "--out", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, "answers no lab")
    assert main(["grade", str(tmp_path / "missing.ipynb"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys.readouterr().err, "missing.ipynb")


def test_debug_shows_the_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "deepen", "--debug", "verify", str(tmp_path / "a"), str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "FileNotFoundError" in done.stderr


# --- one writer per run folder, and checkpoints that survive damage


def run_args(base: Path, out: Path, *extra: str) -> list[str]:
    return [f"model={base}", "grow={method: llama-pro, groups: 2}", "data.seq_len=32", "data.max_tokens=4096",
            "train.global_batch=4", "train.micro_batch=2", "train.lr=1e-2", "train.eval_every=2", "train.eval_batches=1",
            f"out={out}", *extra]


SLOW_TRAINING = """
import sys, time
from deepen.config import load_config
from deepen.train import train
train(load_config(None, sys.argv[1:]), progress=False, callback=lambda record, model: time.sleep(0.5))
"""


def test_a_second_run_into_the_same_folder_refuses_at_once(small_llama_path, tmp_path):
    out = tmp_path / "run"
    args = run_args(small_llama_path, out, "train.steps=12", "train.save_every=4")
    first = subprocess.Popen([sys.executable, "-c", SLOW_TRAINING, *args], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "metrics.jsonl").is_file(), first.stderr.read() if first.poll() is not None else "no metrics"
    began = time.time()
    second = subprocess.run([sys.executable, "-c", "import sys; from deepen.cli import main; sys.exit(main(sys.argv[1:]))",
                             "train", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), *args], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert time.time() - began < 60 and first.poll() is None  # refused while the first still trains
    assert second.returncode != 0
    one_line_error(second.stderr, f"{out} is being written by another process", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(13))  # one run's records, in order


def test_a_lock_whose_holder_was_killed_is_taken_over(tmp_path):
    from deepen.manifest import one_writer

    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from deepen.manifest import one_writer
        with one_writer({str(folder)!r}):
            open({str(tmp_path / 'held')!r}, "w").close()
            time.sleep(600)
        """)])
    deadline = time.time() + 60
    while not (tmp_path / "held").exists() and time.time() < deadline:
        time.sleep(0.1)
    said = []
    with pytest.raises(Exception, match=f"is being written by another process \\(pid {holder.pid} on"):
        with one_writer(folder, say=said.append):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with one_writer(folder, say=said.append):
        pass
    assert len(said) == 1 and f"took over {folder}" in said[0] and f"pid {holder.pid}" in said[0]
    with one_writer(folder, say=said.append):  # released cleanly: nothing more to say
        pass
    assert len(said) == 1


class Killed(Exception):
    pass


def killed_at_5(args: list[str]) -> None:
    """Train the run and stop it as if killed after step 5 (its checkpoints at steps 2 and 4 kept)."""
    def kill(record, model):
        if record["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train(load_config(None, args), progress=False, callback=kill)


def damage_file(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:  # one bit flipped in the middle of the tensors
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_last_checkpoint_resumes_from_the_one_before(small_llama_path, tmp_path, how, capsys):
    def curve(out):
        return [(r["step"], r.get("loss"), r.get("ppl_general")) for r in
                (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())]

    args = run_args(small_llama_path, tmp_path / "whole", "train.steps=6", "train.save_every=2")
    train(load_config(None, args), progress=False)
    cut = tmp_path / "cut"
    args = run_args(small_llama_path, cut, "train.steps=6", "train.save_every=2")
    killed_at_5(args)
    assert sorted(p.name for p in (cut / CHECKPOINTS).iterdir()) == ["step-0000002", "step-0000004"]
    damage_file(cut / CHECKPOINTS / "step-0000004" / "rank-00000.safetensors", how)
    capsys.readouterr()
    train(load_config(None, args), progress=False)
    said = capsys.readouterr().out
    assert "resuming from step-0000002: the newer checkpoint is damaged" in said and "rank-00000.safetensors" in said
    assert curve(cut) == curve(tmp_path / "whole")  # exactly the uninterrupted run's losses from step 2 on


def test_no_usable_checkpoint_is_one_line_and_restart_starts_over(small_llama_path, tmp_path, capsys):
    out = tmp_path / "run"
    args = run_args(small_llama_path, out, "train.steps=6", "train.save_every=2")
    killed_at_5(args)
    for step in ("step-0000002", "step-0000004"):
        damage_file(out / CHECKPOINTS / step / "rank-00000.safetensors", "truncated")
    command = ["train", "--config", str(REPO / "configs" / "tiny-cpu.yaml"), *args]
    assert main(command) == 2
    one_line_error(capsys.readouterr().err, "no checkpoint", "can be resumed from", "--restart")
    assert main([*command, "--restart"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7))
