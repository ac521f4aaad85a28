import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # pytest -n 2 on 2 cores: one thread per worker


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
