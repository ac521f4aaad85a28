"""deepen.checkpoint: growing a checkpoint on disk, streaming, gives the same model as growing it in memory."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from deepen.checkpoint import CheckpointError, expand, parse_size, read_header
from deepen.grow import grow
from deepen.manifest import Manifest
from deepen.plan import custom, dus, idus, llama_pro, stack

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64)


def _save(root: Path, name: str, arch: str = "llama", dtype=torch.float32, tied=False, max_shard_size=None, seed=0):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tied))
    with torch.no_grad():  # make norm scales non-trivial so a wrong copy cannot go unnoticed
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    path = root / name
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / ".hidden").write_text("not copied")
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "llama": _save(root, "llama"),  # untied, one file
        "llama-tied-sharded": _save(root, "llama-tied-sharded", tied=True, max_shard_size="60KB", seed=1),
        "llama-bf16": _save(root, "llama-bf16", dtype=torch.bfloat16, seed=2),
        "qwen2-tied": _save(root, "qwen2-tied", arch="qwen2", tied=True, seed=3),  # q/k/v biases, layer_types
        "qwen2-bf16-sharded": _save(root, "qwen2-bf16-sharded", arch="qwen2", dtype=torch.bfloat16,
                                    max_shard_size="40KB", seed=4),
    }


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))


def _tied(model) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _weight_names(folder: Path) -> dict[str, str]:
    """name -> file, from the safetensors headers themselves."""
    return {name: f.name for f in sorted(folder.glob("*.safetensors")) for name in read_header(f)[0]}


def _assert_clean(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------------------ same function

@pytest.mark.parametrize("base", ["llama", "llama-tied-sharded", "llama-bf16", "qwen2-tied", "qwen2-bf16-sharded"])
@pytest.mark.parametrize("plan", [llama_pro(4, groups=2), llama_pro(4, groups=1, copies=2),
                                  llama_pro(4, groups=4, placement="top")], ids=lambda p: " ".join(map(str, p.layers)))
def test_llama_pro_is_exactly_the_base(bases, base, plan, tmp_path):
    out = expand(bases[base], tmp_path / "out", plan, progress=False)
    before, after = _load(bases[base]), _load(out)
    assert after.config.num_hidden_layers == plan.n_layers
    assert after.dtype == before.dtype
    assert _tied(after) == _tied(before) == after.config.tie_word_embeddings
    assert torch.equal(_logits(after, IDS), _logits(before, IDS))
    if base.startswith("qwen2"):
        assert len(after.config.layer_types) == plan.n_layers
    manifest = Manifest.read(out); saved, manifest = manifest.plan, manifest.to_dict()
    assert saved == plan and manifest["new_layers"] == plan.new_layers
    assert manifest["base"] == str(bases[base])


@pytest.mark.parametrize("base", ["llama", "llama-tied-sharded", "qwen2-bf16-sharded"])
@pytest.mark.parametrize("plan", [dus(4, drop=1), idus(4, drop=1, group=1), stack(4), custom("0-2,1,3")],
                         ids=lambda p: p.method + json.dumps(p.args, sort_keys=True))
def test_other_plans_equal_in_memory_growth(bases, base, plan, tmp_path):
    out = expand(bases[base], tmp_path / "out", plan, progress=False)
    before, after = _load(bases[base]), _load(out)
    expected = grow(before, plan)
    assert after.dtype == before.dtype
    assert torch.equal(_logits(after, IDS), _logits(expected, IDS))
    assert not torch.equal(_logits(after, IDS), _logits(before, IDS))  # these plans change the function


def test_tensors_are_byte_copies_and_zeros(bases, tmp_path):
    src = bases["llama-bf16"]
    plan = llama_pro(4, groups=2)
    out = expand(src, tmp_path / "out", plan, progress=False)
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        assert set(b.keys()) == {k for k in a.keys() if ".layers." not in k} | {
            k.replace(f".layers.{s}.", f".layers.{i}.") for i, s in enumerate(plan.sources)
            for k in a.keys() if f".layers.{s}." in k}
        for i, layer in enumerate(plan.layers):
            for k in a.keys():
                if f".layers.{layer.source}." not in k:
                    continue
                got = b.get_tensor(k.replace(f".layers.{layer.source}.", f".layers.{i}."))
                want = a.get_tensor(k)
                assert got.dtype == want.dtype == torch.bfloat16
                if layer.zero and ("o_proj" in k or "down_proj" in k):
                    assert got.shape == want.shape and not got.any()
                else:
                    assert torch.equal(got, want)
        assert b.metadata() == {"format": "pt"}


def test_without_kernel_copies(bases, tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "copy_file_range", unsupported)  # e.g. an old kernel: copy through a buffer instead
    src = bases["llama-tied-sharded"]
    out = expand(src, tmp_path / "out", llama_pro(4, groups=2), max_shard_size="70KB", progress=False)
    assert torch.equal(_logits(_load(out), IDS), _logits(_load(src), IDS))


def test_mixed_dtypes_are_kept_per_tensor(bases, tmp_path):
    src = tmp_path / "mixed"
    shutil.copytree(bases["llama-bf16"], src)
    with safe_open(src / "model.safetensors", "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.float() if "norm" in k else v for k, v in state.items()}  # fp32 norms, bf16 matrices
    state["model.layers.0.extra_int8"] = torch.arange(7, dtype=torch.int8)  # an odd byte count in the middle
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = expand(src, tmp_path / "out", llama_pro(4, groups=2), progress=False)
    header, _ = read_header(out / "model.safetensors")
    assert header["model.layers.2.input_layernorm.weight"].dtype == "F32"
    assert header["model.layers.2.self_attn.q_proj.weight"].dtype == "BF16"
    for t in header.values():  # every tensor starts aligned to its element size
        assert t.offset % {"F32": 4, "BF16": 2, "I8": 1}[t.dtype] == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.extra_int8"), torch.arange(7, dtype=torch.int8))
        assert torch.equal(f.get_tensor("model.layers.3.input_layernorm.weight"),
                           state["model.layers.2.input_layernorm.weight"])


# ---------------------------------------------------------------------------------------------- output layout

def test_sharded_output_and_index(bases, tmp_path):
    src = bases["llama-tied-sharded"]
    out = expand(src, tmp_path / "out", llama_pro(4, groups=2), max_shard_size="50KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    count = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert index["weight_map"] == _weight_names(out)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stays tied
    headers = [read_header(f)[0] for f in files]
    assert index["metadata"]["total_size"] == sum(t.nbytes for h in headers for t in h.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel for h in headers for t in h.values())
    for f, h in zip(files, headers):
        data = sum(t.nbytes for t in h.values())
        assert data <= 50_000 or len(h) == 1
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            assert n % 8 == 0 and json.loads(fh.read(n))["__metadata__"] == {"format": "pt"}
        assert f.stat().st_size == 8 + n + data  # contiguous, nothing after the data
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["tie_word_embeddings"] is True
    assert {p.name for p in out.iterdir()} == {
        *(f.name for f in files), "model.safetensors.index.json", "config.json", "generation_config.json",
        "tokenizer_config.json", "chat_template.jinja", "expansion.json"}
    manifest = json.loads((out / "expansion.json").read_text())
    assert manifest["dtype"] == "float32" and manifest["source_files"] == sorted(
        p.name for p in src.glob("model-*.safetensors"))


def test_one_tensor_per_shard_zeros_at_the_end_of_a_file(bases, tmp_path):
    src = bases["qwen2-tied"]
    plan = llama_pro(4, groups=2)
    out = expand(src, tmp_path / "out", plan, max_shard_size=1, progress=False)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) == len(_weight_names(out))  # a shard per tensor: some shards are nothing but zeros
    zero_file = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.2.mlp.down_proj.weight"]
    with safe_open(zero_file, "pt") as f:
        assert not f.get_tensor("model.layers.2.mlp.down_proj.weight").any()
    assert torch.equal(_logits(_load(out), IDS), _logits(_load(src), IDS))


def test_one_file_when_it_fits_and_int_sizes(bases, tmp_path):
    out = expand(bases["llama-tied-sharded"], tmp_path / "out", llama_pro(4, groups=2), max_shard_size=10**9,
                 progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) == 1


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 gb") == 1_500_000_000
    for bad in ("lots", "5XB", 0, "-1GB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_as_a_function_of_the_depth(bases, tmp_path):
    out = expand(bases["llama"], tmp_path / "out", lambda n: llama_pro(n, groups=2), progress=False)
    assert Manifest.read(out).plan == llama_pro(4, groups=2)


def test_overwrite(bases, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        expand(bases["llama"], out, llama_pro(4, groups=2), progress=False)
    assert (out / "old.txt").exists()
    expand(bases["llama"], out, llama_pro(4, groups=2), overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "expansion.json").exists()


def test_corrupt_pickle_is_a_clear_error(bases, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(bases["llama"] / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="cannot read .* weights-only"):
        expand(src, out, llama_pro(4, groups=2), allow_pickle=True, progress=False)
    _assert_clean(out)


def test_pickle_refused_unless_allowed(bases, tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    model = _load(bases["llama-bf16"])
    shutil.copy(bases["llama-bf16"] / "config.json", src)
    state = model.state_dict()
    names = list(state)
    torch.save({k: state[k] for k in names[:20]}, src / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in names[20:]}, src / "pytorch_model-00002-of-00002.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: f"pytorch_model-0000{1 if i < 20 else 2}-of-00002.bin" for i, k in enumerate(names)}}))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="allow_pickle"):
        expand(src, out, llama_pro(4, groups=2), progress=False)
    _assert_clean(out)
    expand(src, out, llama_pro(4, groups=2), allow_pickle=True, progress=False)
    assert not list(out.glob("*.bin")) and not list(out.glob(".*"))
    after = _load(out)
    assert after.dtype == torch.bfloat16
    assert torch.equal(_logits(after, IDS), _logits(model, IDS))
    assert Manifest.read(out).extra["source_format"] == "pickle"


# --------------------------------------------------------------------------------------------------- errors

def _broken(bases, tmp_path, base="llama-tied-sharded"):
    src = tmp_path / "broken"
    shutil.copytree(bases[base], src)
    return src


def _shard(src: Path) -> Path:
    return sorted(src.glob("model-*.safetensors"))[1]


def _corrupt_header_length(src):
    with open(_shard(src), "r+b") as f:
        f.write(struct.pack("<Q", 10**12))


def _corrupt_json(src):
    path = _shard(src)
    data = bytearray(path.read_bytes())
    data[8] = ord("!")
    path.write_bytes(bytes(data))


def _truncate(src):
    path = _shard(src)
    os.truncate(path, path.stat().st_size - 100)


def _offsets_beyond(src):
    path = _shard(src)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _tiny_file(src):
    _shard(src).write_bytes(b"\x01\x02")


def _missing_shard(src):
    _shard(src).unlink()


def _missing_config(src):
    (src / "config.json").unlink()


def _edit_config(**changes):
    def edit(src):
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))
    return edit


def _no_weights(src):
    for f in src.glob("model*"):
        f.unlink()


@pytest.mark.parametrize("break_it, error, match", [
    (_corrupt_header_length, CheckpointError, "truncated or corrupt"),
    (_corrupt_json, CheckpointError, "not valid JSON"),
    (_truncate, CheckpointError, "truncated or corrupt"),
    (_offsets_beyond, CheckpointError, "truncated or corrupt"),
    (_tiny_file, CheckpointError, "too short"),
    (_missing_shard, FileNotFoundError, "missing"),
    (_missing_config, FileNotFoundError, "config.json"),
    (_no_weights, FileNotFoundError, "no weights"),
    (_edit_config(model_type="gpt2"), NotImplementedError, "not supported"),
    (_edit_config(model_type="mixtral", num_local_experts=8), NotImplementedError, "mixture-of-experts"),
    (_edit_config(num_hidden_layers=6), ValueError, "n_layers=6"),
], ids=lambda x: getattr(x, "__name__", None) if callable(x) else None)
def test_errors_leave_nothing_behind(bases, tmp_path, break_it, error, match):
    src = _broken(bases, tmp_path)
    break_it(src)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        expand(src, out, llama_pro(4, groups=2), progress=False)
    _assert_clean(out)


def test_wrong_plan_size(bases, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="plan is for 8 layers"):
        expand(bases["llama"], out, llama_pro(8, groups=2), progress=False)
    _assert_clean(out)


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="not found"):
        expand(tmp_path / "no-such-model", out, llama_pro(4, groups=2), progress=False)
    _assert_clean(out)


def test_hub_id_offline_is_a_clear_error(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub.*HF_HUB_OFFLINE"):
        expand("deepen-test-nobody/no-such-model", out, llama_pro(4, groups=2), progress=False)
    _assert_clean(out)


# ----------------------------------------------------------------------------------------------- real model

def test_smollm2_llama_pro_is_exact(smollm2_model, smollm2_tokenizer, tmp_path):
    plan = llama_pro(30, groups=6)
    out = expand("smollm2", tmp_path / "smol-pro", plan, max_shard_size="300MB", progress=False)
    assert len(list(out.glob("model-*.safetensors"))) == 3
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    grown = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert grown.config.num_hidden_layers == 36 and _tied(grown)
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(_logits(grown, ids), _logits(smollm2_model, ids))
    assert Manifest.read(out).base == "smollm2"
