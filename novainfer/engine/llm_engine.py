"""The engine: requests in, one scheduled model step at a time, RequestOutputs out.

`add_request` validates and enqueues; `step` schedules, runs the model, samples, applies
stop rules and returns the requests that progressed. The server's engine core process
(server/engine_core.py) drives the same engine with `detokenize=False`: it calls `advance`
and ships each step's new tokens to the frontend, which owns the text (detokenization, stop
strings, logprob token texts) and reports stop strings back with `finish_sequence`.
"""

from __future__ import annotations

import itertools
import json
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from novainfer.config import EngineConfig
from novainfer.distributed.parallel import check_shapes
from novainfer.distributed.workers import run_external_rank, torchrun_rank
from novainfer.engine.block_manager import BlockManager
from novainfer.engine.detokenizer import (
    IncrementalDetokenizer,
    decorate,
    output_text,
    stop_string_hit,
)
from novainfer.engine.model_runner import LaunchedStep, ModelRunner, launch_for
from novainfer.engine.scheduler import ScheduledBatch, Scheduler
from novainfer.engine.sequence import Sequence
from novainfer.engine.step_timer import StepTimer, enabled_by_env
from novainfer.inputs import PromptInputs, check_length, check_request, prompt_inputs
from novainfer.loader.model_path import resolve_model
from novainfer.lora.manager import LoRAManager
from novainfer.lora.request import LoRARequest
from novainfer.models.config import ModelConfig
from novainfer.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from novainfer.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    stream: bool
    metrics: RequestMetrics
    # Its sampling reads the whole history (penalties) or it wants prompt logprobs: steps
    # run synchronously while it is in the engine (LLMEngine.advance).
    synchronous: bool = False
    detokenizers: list[IncrementalDetokenizer | None] = field(default_factory=list)


@dataclass
class LaunchedBatch:
    step: LaunchedStep
    num_new_tokens: list[int]


@dataclass
class StepDelta:
    """What one step changed: each sampled (sequence, token, logprobs) in batch order, the
    prompt logprobs computed this step, and the requests that progressed with whether each
    has now finished (finished ones are gone from `LLMEngine.requests`)."""

    tokens: list[tuple[Sequence, int, PositionLogprobs | None]]
    prompt_logprobs: list[tuple[Sequence, list[PositionLogprobs]]]
    requests: list[tuple[Request, bool]]
    num_new_tokens: list[int]
    timed: bool = True  # the step timer (if set) timed this step


class LLMEngine:
    def __init__(self, config: EngineConfig, detokenize: bool = True) -> None:
        from transformers import AutoTokenizer

        self.config = config
        # False: outputs carry token ids only (no text, no stop strings, no logprob texts);
        # the server's frontend process does that work (server/request_state.py).
        self.detokenize = detokenize
        folder = resolve_model(config.model)
        self.model_folder = folder
        self.model_config = ModelConfig.from_folder(folder)
        self.tokenizer = (
            None
            if config.skip_tokenizer_init
            else AutoTokenizer.from_pretrained(str(config.tokenizer or folder))
        )
        self._token_texts: dict[int, str] = {}  # token id -> text, for logprob entries
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        if config.max_model_len and config.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings ({self.model_config.max_position_embeddings})"
            )
        self.eos_ids = _eos_ids(folder, self.tokenizer)
        if config.max_num_batched_tokens is None:
            cuda = config.torch_device().type == "cuda"
            # CPU: 512-token chunks keep activations in cache (measured 25% faster prefill).
            config.max_num_batched_tokens = 16384 if cuda else 512
        size = config.tensor_parallel_size
        rank = torchrun_rank(size) if size > 1 else None
        if rank:  # a rank > 0 started by torchrun: serve rank 0's steps, then leave
            check_shapes(self.model_config, size)
            run_external_rank(rank, launch_for(config), config, self.model_config, folder,
                              self.max_model_len)
            raise SystemExit(0)
        self.runner = ModelRunner(config, self.model_config, folder, self.max_model_len)
        # Worker processes (tensor parallelism) end with this engine, or at exit at the latest.
        self._finalizer = weakref.finalize(self, self.runner.shutdown)
        # The driver's block tables take the shape of the ranks' copies, whose entries they
        # address by flat index (engine/block_tables.py).
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
            *self.runner.worker.block_tables.shape,
        )
        self.lora = (LoRAManager(self.model_config, config.max_loras, config.max_lora_rank,
                                 config.max_cpu_loras) if config.enable_lora else None)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
            config.max_loras if config.enable_lora else None,
        )
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.num_steps = 0
        self.overlap = config.overlaps_steps()  # async_scheduling, resolved
        self._in_flight: LaunchedBatch | None = None  # launched, not yet collected (overlap)
        self._num_synchronous = 0  # requests that need synchronous steps (see `advance`)
        self.clock = time.time  # for RequestMetrics; tests inject their own
        # Per-step phase timing (novainfer/engine/step_timer.py); None = off, zero cost.
        self.step_timer = None
        if enabled_by_env():
            self.enable_step_timing(report_at_exit=True)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # -- requests ---------------------------------------------------------------------------

    def process_prompt(self, prompt: Any) -> PromptInputs:
        """Validate one prompt in any accepted form (novainfer/inputs.py), tokenize text, and
        return its token ids; raises ValueError/TypeError naming what is wrong."""
        return prompt_inputs(prompt, self.tokenizer, self.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: SamplingParams,
        stream: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue one request. `prompt`: a string, token ids, a vLLM-style prompt dict, or the
        PromptInputs that `process_prompt` returned; `lora_request`: its adapter (None: the
        base model)."""
        if request_id in self.requests:
            raise ValueError(f"request_id '{request_id}' is already in use")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        inputs = self.process_prompt(prompt)
        ids = inputs.token_ids
        salt = check_request(inputs, params, self.max_model_len, self.vocab_size)
        if params.stop_list and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True was set)")
        lora_id = self.check_lora(lora_request)
        metrics = RequestMetrics(arrival_time=self.clock())
        extras = (("cache_salt", salt),) if salt else ()
        if lora_id:  # KV computed under one adapter never serves another
            extras += (("lora", lora_id),)
        seqs: list[Sequence] = []
        for index in range(params.n):
            seed = params.seed + index if params.seed is not None else None
            seqs.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    request_id=request_id,
                    index=index,
                    token_ids=list(ids),
                    num_prompt_tokens=len(ids),
                    params=params,
                    generator=self._generator(seed),
                    metrics=metrics,
                    parent=seqs[0] if index else None,
                    cache_extras=extras,
                    max_num_tokens=min(len(ids) + params.max_tokens, self.max_model_len),
                    lora_int_id=lora_id,
                )
            )
        needs_text = (
            (stream or bool(params.stop_list)) and self.tokenizer is not None and self.detokenize
        )
        request = Request(request_id, inputs.text, ids, params, seqs, stream, metrics,
                          synchronous=params.has_penalties or params.prompt_logprobs is not None)
        request.detokenizers = [
            IncrementalDetokenizer(
                self.tokenizer, ids, params.skip_special_tokens,
                params.spaces_between_special_tokens,
            ) if needs_text else None
            for _ in seqs
        ]
        self.requests[request_id] = request
        self._num_synchronous += request.synchronous
        if lora_id:
            self.lora.acquire(lora_id)
        for seq in seqs:
            self.scheduler.add(seq)

    def check_lora(self, lora_request: LoRARequest | None) -> int:
        """Accept a request's adapter (read and checked on first use); its id, 0 for none."""
        if lora_request is None:
            return 0
        if self.lora is None:
            raise ValueError("lora_request was given but this engine was started without "
                             "enable_lora=True")
        self.lora.register(lora_request)
        return lora_request.lora_int_id

    def check_length(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        check_length(num_prompt_tokens, params.max_tokens, self.max_model_len)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        """A private generator for seeded requests; unseeded ones share the engine's."""
        if seed is None:
            return None
        return torch.Generator(device=self.runner.device).manual_seed(seed)

    def _remove(self, request: Request) -> None:
        del self.requests[request.request_id]
        self._num_synchronous -= request.synchronous
        lora_id = request.seqs[0].lora_int_id
        if lora_id:
            self.lora.release(lora_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._remove(request)
        request.metrics.finished_time = self.clock()
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self._output(request)

    def finish_sequence(self, request_id: str, index: int, stop_reason: str) -> bool:
        """End one sequence with reason "stop" because its text reached `stop_reason` (the
        server's frontend, which holds the text, found it); True when that ended its request,
        which then leaves `requests`. Unknown requests are ignored (they may have ended)."""
        request = self.requests.get(request_id)
        if request is None or not 0 <= index < len(request.seqs):
            return False
        seq = request.seqs[index]
        if not seq.is_finished:
            self._finish(seq, "stop", stop_reason)
        if not all(s.is_finished for s in request.seqs):
            return False
        request.metrics.finished_time = self.clock()
        self._remove(request)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (also done at exit); the engine cannot step
        afterwards. A no-op for a single-rank engine."""
        self._finalizer()

    # -- the step ---------------------------------------------------------------------------

    def enable_step_timing(self, report_at_exit: bool = False, **kwargs: Any) -> StepTimer:
        """Time every step's phases from now on (see engine/step_timer.py); returns the timer."""
        timer = StepTimer(self.runner.device, **kwargs)
        self.step_timer = self.runner.step_timer = timer
        if report_at_exit:
            import atexit

            atexit.register(lambda: timer.steps and not timer.reported and timer.report())
        return timer

    def disable_step_timing(self) -> None:
        self.step_timer = self.runner.step_timer = None

    def step(self) -> list[RequestOutput]:
        delta = self.advance()
        if delta is None:
            return []
        outputs = [self._output(request) for request, done in delta.requests
                   if done or request.stream]
        self.end_step(delta)
        return outputs

    def advance(self) -> StepDelta | None:
        """Schedule one step, run it, append the sampled tokens and apply the stop rules; None
        when nothing was scheduled. With step timing on, call `end_step` after handling it.

        Overlapped (async_scheduling): schedule and launch step N+1 first, then collect step
        N while the device runs N+1, and return N's delta (empty after the first launch). A
        sequence that step N ends (EOS, a stop token) has then been scheduled once more in
        N+1: that token is dropped when N+1 is collected, so outputs are the same. Requests
        whose sampling reads the whole history (penalties) or that want prompt logprobs run
        synchronously while they are in the engine, and so do timed steps."""
        timer = self.step_timer
        overlap = self.overlap and timer is None and not self._num_synchronous
        if not overlap and self._in_flight is not None:
            step, self._in_flight = self._in_flight, None  # leaving the overlapped mode
            delta = self._complete(step, None)
            delta.timed = False  # launched before the timer was set
            return delta
        if timer is not None:
            timer.start()
            timer.phase("schedule")
        batch = self.scheduler.schedule()
        launched = None
        if batch.seqs:
            if timer is not None:
                timer.phase("prepare")  # the runner marks forward and sample
            launched = self._launch(batch, overlap)
        elif timer is not None:
            timer.cancel()
        if not overlap:
            return None if launched is None else self._complete(launched, timer)
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return None if launched is None else StepDelta([], [], [], [])
        return self._complete(previous, None)

    def _launch(self, batch: ScheduledBatch, overlap: bool) -> LaunchedBatch:
        """Queue a scheduled batch on the device; its tokens become computed and the tokens it
        samples pending."""
        self.num_steps += 1
        scheduled = self.clock()
        if self.lora is not None:
            self._assign_lora_slots(batch)
        step = self.runner.launch(batch, self.eos_ids, share_samples=overlap)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.cache_computed_blocks(seq)
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = scheduled
        for row, seq in enumerate(step.host.sampling_seqs):
            seq.num_pending += 1
            seq.pending_row = row
        return LaunchedBatch(step, batch.num_new_tokens)

    def _assign_lora_slots(self, batch: ScheduledBatch) -> None:
        """Device slots for the batch's adapters, loading those not in one yet."""
        lora = self.lora
        for slot, adapter in lora.assign({s.lora_int_id for s in batch.seqs if s.lora_int_id}):
            try:
                self.runner.load_lora(slot, adapter)
            except BaseException:
                lora.empty_slot(slot)
                raise
        for seq in batch.seqs:
            seq.lora_slot = lora.slot_of[seq.lora_int_id] if seq.lora_int_id else -1

    def _complete(self, launched: LaunchedBatch, timer: StepTimer | None) -> StepDelta:
        """Wait for a launched step; append its tokens and apply the stop rules."""
        result = self.runner.collect(launched.step)
        if timer is not None:
            timer.phase("postprocess")
        now = self.clock()
        prompt_logprobs = []
        for seq, entries in result.prompt_logprobs:
            entries = [self._decorate(e) for e in entries]
            seq.prompt_logprobs.extend(entries)
            prompt_logprobs.append((seq, entries))
        touched: dict[str, Request] = {}
        ended: set[str] = set()  # requests with a sequence that finished this step
        tokens = []
        cache = self.block_manager.cache_computed_blocks
        for seq, token, lp in zip(result.seqs, result.tokens, result.logprobs):
            if seq.is_finished:
                continue  # ended (or aborted) after this step was launched: not an output
            seq.num_pending -= 1
            request = self.requests[seq.request_id]
            tokens.append((seq, token, self._append(request, seq, token, lp)))
            touched[request.request_id] = request
            if seq.finish_reason is not None:
                ended.add(request.request_id)
            elif seq.block_table:
                cache(seq)  # blocks that held the pending token are full now
        progressed = []
        for request_id, request in touched.items():
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
            done = request_id in ended and all(s.is_finished for s in request.seqs)
            if done:
                metrics.finished_time = now
                self._remove(request)
            progressed.append((request, done))
        return StepDelta(tokens, prompt_logprobs, progressed, launched.num_new_tokens)

    def end_step(self, delta: StepDelta) -> None:
        """Close the step's timing (a no-op when step timing is off)."""
        timer = self.step_timer
        if timer is not None and delta.timed:
            num_new = delta.num_new_tokens
            timer.stop(sum(num_new), len(num_new), num_new.count(1) == len(num_new))

    def _append(
        self, request: Request, seq: Sequence, token: int, lp: PositionLogprobs | None
    ) -> PositionLogprobs | None:
        """Append one sampled token and apply the stop rules; the position's logprobs."""
        params = seq.params
        seq.append_token(token)
        if lp is not None:  # decorated once here, so streamed outputs never redo old positions
            lp = self._decorate(lp)
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp[token].logprob
        num_output = len(seq.token_ids) - seq.num_prompt_tokens
        past_min = num_output >= params.min_tokens
        detok = request.detokenizers[seq.index]
        if past_min and not params.ignore_eos and token in self.eos_ids:
            self._finish(seq, "stop", None)
        elif past_min and token in params.stop_token_ids:
            self._finish(seq, "stop", token)
        if seq.finish_reason is None and detok is not None:
            stop = stop_string_hit(detok, seq.token_ids, params, past_min)
            if stop is not None:
                self._finish(seq, "stop", stop)
        if seq.finish_reason is None and (
            num_output >= params.max_tokens or len(seq.token_ids) >= self.max_model_len
        ):
            self._finish(seq, "length", None)
        return lp

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)

    # -- outputs ----------------------------------------------------------------------------

    def _text(self, request: Request, seq: Sequence) -> str:
        if not self.detokenize:
            return ""
        return output_text(self.tokenizer, request.detokenizers[seq.index],
                           seq.output_token_ids, seq.params, seq.finish_reason, seq.stop_reason)

    def _output(self, request: Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            logprobs = list(seq.logprobs) if seq.logprobs is not None else None
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=self._text(request, seq),
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=all(s.is_finished for s in request.seqs),
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs else None,
            metrics=replace(request.metrics),
        )

    def _decorate(self, position: PositionLogprobs) -> PositionLogprobs:
        """The entries with each token's text (decoded once per token id and kept: prompt
        logprobs name up to k + 1 tokens for every prompt position)."""
        if self.tokenizer is None or not self.detokenize:
            return position
        return decorate(self.tokenizer, self._token_texts, position)


def _eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
