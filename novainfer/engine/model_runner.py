"""Owns the model weights and the KV cache; turns a scheduled batch into sampled tokens.

Step metadata (input ids, positions, slot mapping, block tables, sequence lengths) is built
once per step here, copied to the device once, and handed to the model explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from novainfer.config import EngineConfig
from novainfer.engine.cuda_graphs import DecodeGraphs
from novainfer.engine.sampler import logprob_entries, sample
from novainfer.engine.scheduler import ScheduledBatch
from novainfer.engine.sequence import Sequence
from novainfer.layers.attention import AttentionMetadata, get_backend
from novainfer.layers.linear import CpuPackable, pack_for_cpu
from novainfer.loader.weights import init_dummy_weights, load_weights
from novainfer.models.config import ModelConfig
from novainfer.models.registry import model_class
from novainfer.outputs import PositionLogprobs
from novainfer.threads import cpu_thread_control

CPU_DEFAULT_KV_BYTES = 2 << 30
MAX_DECODE_SPLITS = 32
PROMPT_LOGPROBS_ROWS = 1024  # LM-head rows per pass for prompt logprobs (bounds the memory)


@dataclass
class PromptLogprobRows:
    """Prompt positions [first, first + count) of `seq` computed this step, at rows
    [row, row + count) of the step's hidden states; each predicts the next prompt token."""

    seq: Sequence
    row: int
    first: int
    count: int


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_seqs: list[Sequence]
    prompt_rows: list[PromptLogprobRows]


@dataclass
class StepOutput:
    """The sequences that sampled, their new tokens and logprobs, and the prompt logprobs
    computed this step (sequence, the entries for its next prompt positions)."""

    seqs: list[Sequence]
    tokens: list[int]
    logprobs: list[PositionLogprobs | None]
    prompt_logprobs: list[tuple[Sequence, list[PositionLogprobs]]]


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, folder: Path, max_model_len: int
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device, model_config.torch_dtype)
        self.block_size = config.block_size
        self.backend = get_backend(
            config.attention_backend, self.device, model_config.head_dim,
            block_size=self.block_size, dtype=self.dtype,
        )
        self._staging: torch.Tensor | None = None
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.step_timer = None  # set by LLMEngine.enable_step_timing: phase marks below
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(model_config)(model_config, max_model_len, self.backend)
        finally:
            torch.set_default_dtype(previous)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, folder, model_config.tie_word_embeddings)
        self.model.eval()
        if self.device.type == "cpu":
            pack_cpu_weights(self.model)
        self.adapt_cpu_threads = cpu_thread_control(self.device)  # novainfer/threads.py
        self.max_model_len = max_model_len
        self.num_blocks = self._num_kv_blocks(max_model_len)
        cfg = model_config
        self.kv_cache = torch.zeros(
            cfg.num_layers, 2, self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.dtype, device=self.device,
        )
        self.graphs: DecodeGraphs | None = None
        if (
            self.device.type == "cuda"
            and not config.enforce_eager
            and getattr(self.backend, "supports_cuda_graphs", False)
        ):
            # Scratch for the largest decode split count, so replays never see a reallocation.
            self.backend.reserve_workspace(
                config.max_num_seqs, cfg.num_heads, cfg.head_dim, MAX_DECODE_SPLITS, self.device
            )
            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, config.max_num_seqs,
                -(-max_model_len // self.block_size), max_model_len,
                cfg.hidden_size, self.dtype, self.device,
            )

    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return cfg.num_layers * 2 * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def _num_kv_blocks(self, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            blocks = self._profile_gpu_blocks()
        else:
            budget = self.config.kv_cache_memory or CPU_DEFAULT_KV_BYTES
            blocks = budget // self.kv_bytes_per_block()
        needed = -(-max_model_len // self.block_size)
        if blocks < needed:
            raise ValueError(
                f"the KV cache holds {blocks} blocks of {self.block_size} tokens, fewer than one "
                f"sequence of max_model_len={max_model_len} needs ({needed}); raise kv_cache_memory "
                f"/ gpu_memory_utilization / num_kv_blocks or lower max_model_len"
            )
        return blocks

    def _profile_gpu_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization after a forward pass at the largest batch."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.max_num_batched_tokens or 1
        cfg = self.model_config
        probe_blocks = -(-tokens // self.block_size)
        probe = torch.zeros(
            cfg.num_layers, 2, probe_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.dtype, device=self.device,
        )
        meta = AttentionMetadata(
            slot_mapping=torch.arange(tokens, device=self.device),
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(probe_blocks, dtype=torch.int32, device=self.device)[None],
            num_decodes=0, max_query_len=tokens, max_seq_len=tokens,
            query_lens_host=[tokens], seq_lens_host=[tokens],
        )
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            # Positions wrap at max_model_len (the rotary table's size); memory use is the same.
            positions = torch.arange(tokens, device=self.device) % self.max_model_len
            hidden = self.model(ids, positions, probe, meta)
            self.model.compute_logits(hidden[-min(tokens, self.config.max_num_seqs):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del probe, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * self.config.gpu_memory_utilization) - peak
        return max(budget // self.kv_bytes_per_block(), 0)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        # Decodes (one new token) first, so attention can batch them together.
        seqs, query_lens = batch.seqs, batch.num_new_tokens
        num_decodes = query_lens.count(1)
        if query_lens[:num_decodes].count(1) < num_decodes:  # a decode follows a prefill
            order = sorted(range(len(batch)), key=lambda i: query_lens[i] != 1)
            seqs = [seqs[i] for i in order]
            query_lens = [query_lens[i] for i in order]
        starts = [seq.num_computed_tokens for seq in seqs]
        # The new tokens' ids are the only per-sequence Python work; the rest is numpy.
        input_ids = [seq.token_ids[p] for seq, p in zip(seqs[:num_decodes], starts)]
        for seq, p, q in zip(seqs[num_decodes:], starts[num_decodes:], query_lens[num_decodes:]):
            input_ids.extend(seq.token_ids[p : p + q])
        n, num_tokens, bs = len(seqs), len(input_ids), self.block_size
        # Each list becomes an array once: numpy converts Python ints slowly.
        start = np.array(starts, dtype=np.int64)
        q = np.array(query_lens, dtype=np.int64)
        seq_lens = start + q
        cu = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        # A chunk that reaches the sequence's last token samples after it.
        num_tokens_now = np.array([len(seq.token_ids) for seq in seqs], dtype=np.int64)
        sampled = np.flatnonzero(seq_lens == num_tokens_now)
        logits_indices = cu[sampled + 1] - 1
        token_row = np.repeat(np.arange(n), q)
        positions = np.arange(num_tokens) - cu[token_row] + start[token_row]
        max_blocks = max([len(seq.block_table) for seq in seqs])
        tables = batch.block_tables[[seq.block_row for seq in seqs], :max_blocks]
        slots = tables[token_row, positions // bs].astype(np.int64) * bs + positions % bs
        # Everything goes to the device in one copy: [ids | positions | slots | seq_lens |
        # query_start_loc | logits_indices | block_tables (n x max_blocks)].
        sizes = [num_tokens, num_tokens, num_tokens, n, n + 1, len(logits_indices)]
        host = np.empty(sum(sizes) + n * max_blocks, dtype=np.int64)
        offsets = np.cumsum([0, *sizes])
        for values, lo in zip(
            (input_ids, positions, slots, seq_lens, cu, logits_indices), offsets
        ):
            host[lo : lo + len(values)] = values
        host[offsets[-1] :] = tables.reshape(-1)
        buf = self._upload(host)
        part = [buf[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
        meta = AttentionMetadata(
            slot_mapping=part[2],
            query_start_loc=part[4].to(torch.int32),
            seq_lens=part[3].to(torch.int32),
            block_tables=buf[offsets[-1] :].view(n, max_blocks).to(torch.int32),
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=int(seq_lens.max()),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens.tolist(),
        )
        return StepInputs(
            input_ids=part[0],
            positions=part[1],
            meta=meta,
            logits_indices=part[5],
            sampling_seqs=[seqs[i] for i in sampled.tolist()],
            prompt_rows=_prompt_logprob_rows(seqs, starts, query_lens, cu),
        )

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy through a reused pinned buffer (no per-step allocation)."""
        t = torch.from_numpy(host)
        if self.device.type != "cuda":
            return t
        if self._staging is None or self._staging.numel() < t.numel():
            self._staging = torch.empty(max(t.numel(), 1 << 20), dtype=torch.int64).pin_memory()
        staging = self._staging[: t.numel()]
        staging.copy_(t)
        return staging.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, eos_ids: list[int]) -> StepOutput:
        """Run one step: the forward pass, prompt logprobs where asked, sampling."""
        self.adapt_cpu_threads()
        inputs = self.prepare(batch)
        timer = self.step_timer
        if timer is not None:
            timer.phase("forward")
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        prompt_logprobs = [(r.seq, self._prompt_logprobs(hidden, r)) for r in inputs.prompt_rows]
        if not inputs.sampling_seqs:
            return StepOutput([], [], [], prompt_logprobs)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if timer is not None:
            timer.phase("sample")
        tokens, logprobs = sample(logits, inputs.sampling_seqs, eos_ids, self.generator)
        return StepOutput(inputs.sampling_seqs, tokens, logprobs, prompt_logprobs)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, rows: PromptLogprobRows
    ) -> list[PositionLogprobs]:
        seq, k = rows.seq, rows.seq.params.prompt_logprobs
        entries: list[PositionLogprobs] = []
        for lo in range(0, rows.count, PROMPT_LOGPROBS_ROWS):
            n = min(PROMPT_LOGPROBS_ROWS, rows.count - lo)
            logits = self.model.compute_logits(hidden[rows.row + lo : rows.row + lo + n])
            first = rows.first + lo + 1  # the prompt token each row predicts
            targets = torch.tensor(seq.token_ids[first : first + n], device=logits.device)
            entries += logprob_entries(logits.float().log_softmax(dim=-1), targets, [k] * n)
        return entries


def _prompt_logprob_rows(
    seqs: list[Sequence], starts: list[int], query_lens: list[int], cu: np.ndarray
) -> list[PromptLogprobRows]:
    """Where this step computes prompt positions whose logprobs are still missing: position
    t predicts prompt token t + 1, and entries 0 .. len(seq.prompt_logprobs) - 1 exist."""
    rows = []
    for i, seq in enumerate(seqs):
        if seq.prompt_logprobs is None:
            continue
        lo = max(starts[i], len(seq.prompt_logprobs) - 1)
        hi = min(starts[i] + query_lens[i], seq.num_prompt_tokens - 1)
        if lo < hi:
            rows.append(PromptLogprobRows(seq, int(cu[i]) + lo - starts[i], lo, hi - lo))
    return rows


def pack_cpu_weights(model: torch.nn.Module) -> None:
    """Give every linear layer (and the LM head) its CPU matmul on a repacked weight, which
    replaces the weight in every module sharing it (a tied embedding too)."""
    sharing: dict[int, list[CpuPackable]] = {}
    for module in model.modules():
        if isinstance(module, CpuPackable):
            sharing.setdefault(id(module.weight), []).append(module)
    for modules in sharing.values():
        pack_for_cpu(modules)
