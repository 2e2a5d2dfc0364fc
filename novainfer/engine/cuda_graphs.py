"""CUDA graphs for decode steps: one graph per batch-size bucket, sharing one memory pool.

A decode batch of n sequences runs the graph of the smallest bucket >= n. Its inputs are
copied into persistent buffers; the padding rows get slot -1 (nothing written to the KV
cache) and sequence length 0 (attention reads nothing), so their outputs are ignored.

With LoRA, each bucket has a second graph for steps where some token uses an adapter. Its
LoRA kernels read static buffers: the adapter tokens grouped by slot, and one segment per
slot (`max_loras` of them, empty ones included), so the launch grid never changes; a replay
fills the buffers from the step's LoRABatch on the device. Adapters load into the slots in
place, so the graphs see them.
"""

from __future__ import annotations

import torch

from novainfer.layers.attention import AttentionMetadata
from novainfer.lora.layers import LoRAState
from novainfer.lora.ops import LoRABatch


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


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
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._capture()

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
    def _capture(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            meta = self._meta(size)
            args = (self.input_ids[:size], self.positions[:size], self.kv_cache, meta)
            for with_lora in (False, True) if self.lora is not None else (False,):
                if self.lora is not None:
                    self.lora.batch = self._lora_batch(size) if with_lora else None
                self.hidden[:size] = self.model(*args)  # warm-up: compiles outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[:size] = self.model(*args)
                pool = graph.pool()
                self.graphs[size, with_lora] = graph
        if self.lora is not None:
            self.lora.batch = None
        torch.cuda.synchronize()

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_seqs and meta.num_seqs <= self.max_size

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        lora: LoRABatch | None = None,
    ) -> torch.Tensor:
        n = meta.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].fill_(0)
        blocks = meta.block_tables.shape[1]
        self.block_tables[:n, :blocks].copy_(meta.block_tables)
        if lora is not None:
            segment_per_slot(lora, self.lora_tokens, self.lora_start, self.lora_counts)
        self.graphs[size, lora is not None].replay()
        return self.hidden[:n]


def segment_per_slot(batch: LoRABatch, tokens: torch.Tensor, starts: torch.Tensor,
                     counts: torch.Tensor) -> None:
    """Write `batch` into static buffers with one segment per slot (slot s: tokens[starts[s]:
    starts[s + 1]], often empty), on the device. The batch's tokens are grouped by ascending
    slot already, so only the segment bounds change."""
    tokens[: batch.tokens.numel()].copy_(batch.tokens)
    counts.zero_()
    counts[batch.seg_slot] = batch.seg_start[1:] - batch.seg_start[:-1]
    torch.cumsum(counts, 0, out=starts[1:])
