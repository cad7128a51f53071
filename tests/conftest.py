import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n",
    "<Parallel><Path>3 + 4 = 7</Path><Path>4 + 3 = 7</Path></Parallel><Summary>Both give 7.</Summary>\n",
    "Final Answer: 7\nAmy reads 12 pages a day for 5 days, then 9 pages. 12 * 5 = 60, 60 + 9 = 69.\n",
    "The answer is \\boxed{42}. Let us check by estimation: about 10 times 6 is 60.\n",
] * 20


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from parallel_r1.tiny import build_tokenizer

    return build_tokenizer(TINY_CORPUS, vocab_size=300)


# A ChatML template (the shape of SmolLM2's and Qwen's), for the tiny tokenizer.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The tiny tokenizer with ChatML turn tokens (special) and a chat template."""
    from transformers import AddedToken

    from parallel_r1.tiny import build_tokenizer

    tokenizer = build_tokenizer(TINY_CORPUS, vocab_size=300)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True)
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A 2-layer Llama in fp32 with sdpa attention, freshly initialised (deterministic)."""
    from parallel_r1.tiny import build_model

    torch.manual_seed(0)
    model = build_model(tiny_tokenizer, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
    return model.eval()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
