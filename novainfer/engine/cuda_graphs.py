"""CUDA graphs: decode steps by batch-size bucket, small prefill steps by token-count bucket.

A decode batch of n sequences runs the graph of the smallest bucket >= n. Its inputs are
copied into persistent buffers; the padding rows get slot -1 (nothing written to the KV
cache) and sequence length 0 (attention reads nothing), so their outputs are ignored.

A prefill step (no decodes, at most PREFILL_GRAPH_SEQS sequences, no adapter) of t tokens
runs the graph of the smallest token bucket >= t (at least 16): eager, such a step is bound by the host
(~150 torch.compile'd and Triton launches of ~100 us each for a 1,000-token prompt of
qwen3-0.6b, against ~4 ms of GPU work). The padding tokens get slot -1 and belong to no
sequence; the padding sequences have no query tokens, so the prefill kernel's programs for
them return at once. Every graph shares one memory pool, the largest captured first.

Decode buckets of at most `sample_seqs` rows (NOVAINFER_SAMPLE_GRAPH_SEQS, 8 by default)
have two more graphs that hold the whole step: the forward pass, the LM head and the
sampler ("greedy": the argmax; "draw": the temperature draw, with 1 / temperature and the
uniforms in static buffers filled before the replay), for steps whose rows fill the bucket
exactly and all sample plainly (engine/sampler.py, `plain_sampling`): no host work between
the forward pass and the sampled ids, and the eager sampler's tokens.

With LoRA, each bucket has a second graph for steps where some token uses an adapter. Its
LoRA kernels read static buffers: the adapter tokens grouped by slot, and one segment per
slot (`max_loras` of them, empty ones included), so the launch grid never changes; a replay
fills the buffers from the step's LoRABatch on the device. Adapters load into the slots in
place, so the graphs see them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from novainfer.engine.sampler import sample_plain
from novainfer.layers.attention import AttentionMetadata
from novainfer.lora.layers import LoRAState
from novainfer.lora.ops import LoRABatch

PREFILL_GRAPH_SEQS = 4  # prefill graphs take steps of at most this many sequences
MIN_PREFILL_BUCKET = 16  # the smallest prefill bucket: no prefill graphs below it
PREFILL_GRAPH_TOKENS = 2048  # default largest prefill bucket (NOVAINFER_PREFILL_GRAPH_TOKENS)
SAMPLE_GRAPH_SEQS = 8  # default largest decode batch sampled inside its graph
SAMPLE_MODES = ("greedy", "draw")


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def padded_rows(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds n rows; n itself when none does (or there are none)."""
    return next((b for b in buckets if b >= n), n)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts a prefill graph is captured at: powers of two from 16 to 512, then every
    256 (a prompt pads by at most a quarter above 512 tokens, where the GPU work starts to
    count), and `max_tokens` itself. None below 16 tokens."""
    if max_tokens < MIN_PREFILL_BUCKET:
        return []
    sizes = [s for s in (MIN_PREFILL_BUCKET, 32, 64, 128, 256) if s < max_tokens]
    sizes += list(range(512, max_tokens, 256))
    return sorted(set(sizes + [max_tokens]))


def _whole_number(value: str | None, name: str, default: int, what: str, zero: str) -> int:
    """An environment setting that is a whole number (`default` when unset or empty)."""
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise ValueError(f"{name} must be a whole number of {what} ({zero}), got {value!r}")
    return int(value)


def prefill_graph_tokens(value: str | None) -> int:
    """NOVAINFER_PREFILL_GRAPH_TOKENS's value, checked: the largest prefill step (in tokens)
    replayed from a CUDA graph; 0 turns prefill graphs off; unset or empty: 2048."""
    return _whole_number(value, "NOVAINFER_PREFILL_GRAPH_TOKENS", PREFILL_GRAPH_TOKENS,
                         "tokens", "0 turns prefill graphs off")


def sample_graph_seqs(value: str | None) -> int:
    """NOVAINFER_SAMPLE_GRAPH_SEQS's value, checked: the largest decode bucket whose LM head
    and sampling replay inside its CUDA graph (0: never); unset or empty: 8."""
    return _whole_number(value, "NOVAINFER_SAMPLE_GRAPH_SEQS", SAMPLE_GRAPH_SEQS,
                         "sequences", "0 samples outside the graphs")


def _forward_sample_into(
    model: torch.nn.Module, logits: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor,
    args: tuple, mode: str, scale: torch.Tensor, u: torch.Tensor,
) -> Callable[[], None]:
    """A call of the model, its LM head and the sampler on `args` that writes the sampled ids
    into `out`."""
    return lambda: out.copy_(sample_plain(logits(model(*args)), mode, scale, u))


def _forward_into(model: torch.nn.Module, out: torch.Tensor, args: tuple) -> Callable[[], None]:
    """A call of the model on `args` that writes its hidden states into `out`."""
    return lambda: out.copy_(model(*args))


def _capture(
    run: Callable[[], None], pool: tuple | None, meta: AttentionMetadata
) -> torch.cuda.CUDAGraph:
    """One graph of `run` (which writes its result into a static buffer, attending with
    `meta`), in `pool`; a warm-up call first, so anything that compiles does so outside the
    capture. `meta.backend_cache` is emptied before the warm-up and again before the capture:
    each derives its per-step values (the decode order, kernels/decode_attention.py) itself.
    The graph must not replay the warm-up's tensors, and the warm-up must not read a tensor
    that an earlier capture with the same metadata allocated but never wrote (a capture runs
    no kernels). The graph's own values stay in the cache until the next capture."""
    meta.backend_cache.clear()
    run()
    torch.cuda.synchronize()
    meta.backend_cache.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        lora: LoRAState | None = None,
        max_loras: int = 0,
        pool: tuple | None = None,
        logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sample_seqs: int = 0,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = bucket_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        n = self.max_size
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.lora = lora
        if lora is not None:
            self.lora_tokens = torch.zeros(n, dtype=torch.long, device=device)
            self.lora_start = torch.zeros(max_loras + 1, dtype=torch.long, device=device)
            self.lora_slots = torch.arange(max_loras, dtype=torch.long, device=device)
            self.lora_counts = torch.zeros(max_loras, dtype=torch.long, device=device)
        # The buckets whose whole step (LM head and sampling too) has graphs, and their
        # static sampling inputs: 1 / temperature and the uniforms (finite in padding rows).
        self.sample_sizes = [s for s in self.sizes if s <= sample_seqs] if logits else []
        self.logits = logits
        m = max(self.sample_sizes, default=0)
        self.tokens = torch.zeros(m, dtype=torch.long, device=device)
        self.scale = torch.ones(m, dtype=torch.float32, device=device)
        self.u = torch.full((m, 1), 0.5, dtype=torch.float32, device=device)
        self.sample_replays = 0  # for tests and tools: steps sampled inside a graph
        self.graphs: dict[tuple[int, bool | str], torch.cuda.CUDAGraph] = {}
        self._capture(pool)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_host=[1] * size,
            seq_lens_host=[self.max_model_len] * size,
        )

    def _lora_batch(self, size: int) -> LoRABatch:
        """The static LoRABatch a bucket's LoRA graph is captured with."""
        return LoRABatch(self.lora_tokens, self.lora_start, self.lora_slots, [], size)

    @torch.inference_mode()
    def _capture(self, pool: tuple | None) -> None:
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
            for with_lora in (False, True) if self.lora is not None else (False,):
                if self.lora is not None:
                    self.lora.batch = self._lora_batch(size) if with_lora else None
                graph = _capture(_forward_into(self.model, self.hidden[:size], args), pool, meta)
                pool = graph.pool()
                self.graphs[size, with_lora] = graph
        if self.lora is not None:
            self.lora.batch = None
        for size in reversed(self.sample_sizes):
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
            for mode in SAMPLE_MODES:
                run = _forward_sample_into(self.model, self.logits, self.tokens[:size], args,
                                           mode, self.scale[:size], self.u[:size])
                graph = _capture(run, pool, meta)
                pool = graph.pool()
                self.graphs[size, mode] = graph
        if self.kv_cache.is_cuda:
            torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_seqs and meta.num_seqs <= self.max_size

    def can_sample(self, meta: AttentionMetadata) -> bool:
        """Whether a decode step of this batch has whole-step graphs (`run_sampled`): its
        rows fill a bucket exactly, since the graphs sample every row of their bucket and
        padding rows would need sampling inputs of their own. (The logits would not change:
        the eager LM head runs at the same bucket row counts, engine/worker.py
        `logit_rows`.)"""
        return meta.num_seqs in self.sample_sizes and self.can_run(meta)

    def run_sampled(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        mode: str, scale: torch.Tensor | None = None, u: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's sampled ids (int64 [rows], a copy): the forward pass, the LM head and
        `sample_plain(mode, scale, u)` in one replay."""
        n = size = meta.num_seqs  # a bucket's size (`can_sample`)
        self._fill(input_ids, positions, meta, size)
        if mode == "draw":
            self.scale[:n].copy_(scale)
            self.u[:n].copy_(u)
        self.graphs[size, mode].replay()
        self.sample_replays += 1
        return self.tokens[:n].clone()  # the next replay rewrites the static buffer

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        n = meta.num_seqs
        size = padded_rows(n, self.sizes)  # a bucket: `can_run`
        self._fill(input_ids, positions, meta, size)
        if lora is not None:
            segment_per_slot(lora, self.lora_tokens, self.lora_start, self.lora_counts)
        self.graphs[size, lora is not None].replay()
        return self.hidden[:n]

    def _fill(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        size: int,
    ) -> None:
        """The step's inputs into the static buffers, padding rows up to `size` inert."""
        n = meta.num_seqs
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].fill_(0)
        blocks = meta.block_tables.shape[1]
        self.block_tables[:n, :blocks].copy_(meta.block_tables)


def segment_per_slot(batch: LoRABatch, tokens: torch.Tensor, starts: torch.Tensor,
                     counts: torch.Tensor) -> None:
    """Write `batch` into static buffers with one segment per slot (slot s: tokens[starts[s]:
    starts[s + 1]], often empty), on the device. The batch's tokens are grouped by ascending
    slot already, so only the segment bounds change."""
    tokens[: batch.tokens.numel()].copy_(batch.tokens)
    counts.zero_()
    counts[batch.seg_slot] = batch.seg_start[1:] - batch.seg_start[:-1]
    torch.cumsum(counts, 0, out=starts[1:])


class PrefillGraphs:
    """Graphs of small prefill steps, one per token bucket (`prefill_buckets`), each for up
    to PREFILL_GRAPH_SEQS sequences. The attention kernel's grid covers the bucket's tokens
    for each of the PREFILL_GRAPH_SEQS sequence slots; a slot's programs past its query
    length return at once."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        max_tokens: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = prefill_buckets(max_tokens)
        self.max_size = self.sizes[-1]
        self.max_model_len = max_model_len
        n, s = self.max_size, PREFILL_GRAPH_SEQS
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # for tests and tools: steps that ran from a graph
        self._capture()

    def pool(self) -> tuple:
        """The memory pool the graphs share (the decode graphs join it)."""
        return self.graphs[self.max_size].pool()

    def _meta(self, size: int) -> AttentionMetadata:
        slots = PREFILL_GRAPH_SEQS
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            num_decodes=0,
            max_query_len=size,  # the kernel's grid: every slot may hold the whole bucket
            max_seq_len=self.max_model_len,
            query_lens_host=[size] * slots,
            seq_lens_host=[self.max_model_len] * slots,
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        # Warm-ups and captures see empty query ranges (query_start_loc all 0) and slot -1:
        # they attend to nothing and write nothing to the cache.
        pool = None
        for size in reversed(self.sizes):
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
            graph = _capture(_forward_into(self.model, self.hidden[:size], args), pool, meta)
            pool = graph.pool()
            self.graphs[size] = graph

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return (meta.num_decodes == 0 and meta.num_seqs <= PREFILL_GRAPH_SEQS
                and num_tokens <= self.max_size)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n, s = input_ids.shape[0], meta.num_seqs
        size = padded_rows(n, self.sizes)  # a bucket: `can_run`
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.query_start_loc[: s + 1].copy_(meta.query_start_loc)
        self.query_start_loc[s + 1 :].fill_(n)  # the empty slots: no query tokens
        self.seq_lens[:s].copy_(meta.seq_lens)
        self.block_tables[:s, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.graphs[size].replay()
        self.replays += 1
        return self.hidden[:n]
