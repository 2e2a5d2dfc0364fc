"""`LLM`: offline generation with vLLM's Python API."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

from novainfer.config import EngineConfig
from novainfer.engine.llm_engine import LLMEngine
from novainfer.inputs import PROMPT_FORMS, PromptInputs, render_chat
from novainfer.lora.request import LoRARequest
from novainfer.outputs import RequestOutput
from novainfer.sampling_params import SamplingParams

Prompt = str | list[int] | dict  # dict: {"prompt": str} or {"prompt_token_ids": [...]}
Message = dict[str, str]


class LLM:
    """Load a model and generate from batches of prompts.

    `model` is a Hugging Face folder, a `.gguf` file, or None for the built-in default model
    (SmolLM2-135M-Instruct). Other arguments mirror vLLM's `LLM`. With
    `tensor_parallel_size` N > 1 the model is split over N GPUs (or N CPU processes), and
    N - 1 worker processes live until `shutdown()` (or `with LLM(...) as llm:`, or exit).
    Under torchrun every rank constructs the same `LLM`; ranks > 0 serve rank 0 inside the
    constructor and then exit.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        tokenizer: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        calculate_kv_scales: bool = False,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory: int | None = None,
        num_kv_blocks: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        load_format: str = "auto",
        skip_tokenizer_init: bool = False,
        tensor_parallel_size: int = 1,
        async_scheduling: bool | None = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
    ) -> None:
        config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
            calculate_kv_scales=calculate_kv_scales,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory=kv_cache_memory,
            num_kv_blocks=num_kv_blocks,
            seed=seed,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            load_format=load_format,
            skip_tokenizer_init=skip_tokenizer_init,
            tensor_parallel_size=tensor_parallel_size,
            async_scheduling=async_scheduling,
            enable_lora=enable_lora,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
        )
        self.llm_engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (as vLLM's); False, and nothing done, while requests hold
        KV blocks."""
        return self.llm_engine.block_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (otherwise when this object is
        collected, or at exit)."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """`lora_request`: one adapter for every prompt, or a list with one per prompt (None
        for the base model); needs `enable_lora=True`."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        loras = _as_lora_list(lora_request, len(prompt_list))
        engine = self.llm_engine
        # Validate the whole batch before queuing any of it, so a bad prompt queues nothing.
        inputs = [engine.process_prompt(p) for p in prompt_list]
        for prompt, p in zip(inputs, params):
            engine.check_length(len(prompt.token_ids), p)
        for lora in loras:
            engine.check_lora(lora)
        request_ids = []
        try:
            for prompt, p, lora in zip(inputs, params, loras):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, p, lora_request=lora)
                request_ids.append(request_id)
            finished = self._run(len(request_ids), use_tqdm)
        except BaseException:
            for request_id in request_ids:
                engine.abort_request(request_id)
            raise
        return [finished[r] for r in request_ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = [self._render(c, add_generation_prompt, chat_template) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def apply_chat_template(
        self,
        conversation: list[Message],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tokenize: bool = True,
    ) -> list[int] | str:
        """The conversation rendered by the model's chat template: token ids, or the prompt
        string with tokenize=False."""
        rendered = self._render(conversation, add_generation_prompt, chat_template)
        return rendered.token_ids if tokenize else rendered.text

    def _render(
        self, conversation: list[Message], add_generation_prompt: bool, chat_template: str | None
    ) -> PromptInputs:
        if not conversation or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in conversation
        ):
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template")
        return render_chat(tokenizer, conversation, add_generation_prompt, chat_template)

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        rate = out_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
                        bar.update(1)
        if bar is not None:
            bar.close()
        return finished


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, (str, dict, PromptInputs)):
        return [prompts]
    if isinstance(prompts, Seq) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # a single prompt given as token ids
    if not isinstance(prompts, Seq) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(
            "prompts must be a prompt or a list of prompts; a prompt is "
            f"{PROMPT_FORMS}; got {type(prompts).__name__}"
        )
    if not prompts:
        raise ValueError("prompts must not be empty")
    return list(prompts)


def _as_lora_list(lora: Any, count: int) -> list[LoRARequest | None]:
    if lora is None or isinstance(lora, LoRARequest):
        return [lora] * count
    if isinstance(lora, Seq) and not isinstance(lora, (str, bytes)):
        if len(lora) != count:
            raise ValueError(f"lora_request has {len(lora)} entries for {count} prompts; give "
                             "one per prompt (None for the base model) or a single LoRARequest")
        for item in lora:
            if item is not None and not isinstance(item, LoRARequest):
                raise TypeError("lora_request entries must be LoRARequest or None, got "
                                f"{type(item).__name__}")
        return list(lora)
    raise TypeError(f"lora_request must be a LoRARequest, a list of them, or None; got "
                    f"{type(lora).__name__}")


def _as_params_list(params: Any, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if isinstance(params, Seq):
        if len(params) != count:
            raise ValueError(
                f"sampling_params has {len(params)} entries but there are {count} prompts; "
                "pass one SamplingParams or one per prompt"
            )
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params entries must be SamplingParams, got {type(p).__name__}")
        return list(params)
    raise TypeError(f"sampling_params must be a SamplingParams or a list, got {type(params).__name__}")
