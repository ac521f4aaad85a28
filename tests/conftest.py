import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # pytest -n 2 on 2 cores: one thread per worker

# tests/browser drives JupyterLab in a real browser: `pytest tests` (make test) leaves it out unless DEEPEN_BROWSER=1,
# which `make test-browser` sets (naming tests/browser on the command line also runs it).
collect_ignore = [] if os.environ.get("DEEPEN_BROWSER") == "1" else ["browser"]


@pytest.fixture(scope="session")
def small_llama_path(tmp_path_factory):
    """A random 4-layer Llama of width 32 (tied embeddings) with the tiny BPE tokenizer, saved to a folder: small
    for testing efficiency, for tests that train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deepen.data import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("small-llama")
    model.save_pretrained(path)
    tiny_tokenizer(4096).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    """Local folder of the real SmolLM2-135M-Instruct (converted once from the offline GGUF and cached)."""
    from deepen.models import smollm2

    return smollm2()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)
