"""The one way to get a rollout engine: `make_engine(backend, ...)`, the HF `engine.ParallelEngine` or the
optional `vllm_backend.VLLMEngine`; the settings and the `Rollout` both return live in `rollout.py`."""

from __future__ import annotations

from parallel_r1.engine import ParallelEngine
from parallel_r1.vllm_backend import VLLMEngine

BACKENDS = ("hf", "vllm")


def make_engine(
    backend: str,
    model,
    tokenizer=None,
    *,
    max_batch_size: int = 64,
    colocate: bool = False,
    behaviour_logprobs: bool = False,
    **vllm_kwargs,
):
    """The rollout engine of `backend`; both have `generate(prompts, n, params) -> list[Rollout]`.

    "hf": `ParallelEngine` on an in-memory model (`max_batch_size` rows decoded together). "vllm":
    `vllm_backend.VLLMEngine` on a model directory, Hub id or `vllm.LLM` (vLLM loads its own copy of the
    weights; the tokenizer defaults to the model's own; `vllm_kwargs` go to `vllm.LLM`). `colocate`: a
    vLLM engine in this process next to a model being trained (`VLLMEngine.colocated`; `load_weights`
    then copies the trained weights into it). `behaviour_logprobs` (hf only): record the log-probs of the
    distribution sampled from (`ParallelEngine`).
    """
    if backend == "hf":
        return ParallelEngine(model, tokenizer, max_batch_size=max_batch_size, behaviour_logprobs=behaviour_logprobs)
    if behaviour_logprobs:
        raise ValueError("behaviour_logprobs needs the hf backend")
    if backend == "vllm":
        if colocate:
            return VLLMEngine.colocated(model, tokenizer, **vllm_kwargs)
        return VLLMEngine(model, tokenizer, **vllm_kwargs)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
