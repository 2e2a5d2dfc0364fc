"""One rank's share of the model: its device, weights, KV cache and CUDA graphs.

Every rank runs the same `ModelWorker` (rank 0 inside the driver's process, the others in
worker processes, novainfer/distributed/workers.py). Given a packed step it runs the
forward pass and the LM head; with tensor parallelism the layers' collectives keep the
ranks in step, and only rank 0 receives the gathered logits. Nothing here samples or knows
about requests: that is the driver's job (engine/model_runner.py).
"""

from __future__ import annotations

import atexit
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from novainfer.config import EngineConfig
from novainfer.distributed.parallel import TensorParallel, kv_heads_per_rank, split
from novainfer.engine.block_tables import new_device_tables
from novainfer.engine.cuda_graphs import (
    MIN_PREFILL_BUCKET,
    DecodeGraphs,
    PrefillGraphs,
    bucket_sizes,
    padded_rows,
    prefill_graph_tokens,
    sample_graph_seqs,
)
from novainfer.engine.step_inputs import HEADER, StepInputs, unpack_step
from novainfer.layers.attention import AttentionMetadata, get_backend
from novainfer.layers.linear import CpuPackable, pack_for_cpu
from novainfer.loader.weights import init_dummy_weights, load_weights
from novainfer.lora import switches as lora_switches
from novainfer.lora.adapter import LoRAAdapter
from novainfer.lora.layers import attach_lora, load_slot
from novainfer.lora.timing import LoRATiming
from novainfer.models.config import ModelConfig
from novainfer.models.decoder import SelfAttention
from novainfer.models.registry import model_class
from novainfer.threads import cpu_thread_control

CPU_DEFAULT_KV_BYTES = 2 << 30
MAX_DECODE_SPLITS = 32
PROMPT_LOGPROBS_ROWS = 1024  # LM-head rows per pass for prompt logprobs (bounds the memory)


class ModelWorker:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        folder: Path,
        max_model_len: int,
        tp: TensorParallel,
        device: torch.device,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.tp = tp
        self.device = device
        self.dtype = config.torch_dtype(device, model_config.torch_dtype)
        self.kv_dtype = config.kv_torch_dtype(self.dtype)  # an fp8 cache: 1 byte per element
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        cfg = model_config
        self.num_heads = split(cfg.num_heads, tp.size, "num_attention_heads")
        self.num_kv_heads, _ = kv_heads_per_rank(cfg.num_kv_heads, tp.size)
        self.backend = get_backend(
            config.attention_backend, device, cfg.head_dim, block_size=self.block_size,
            dtype=self.dtype, kv_cache_dtype=self.kv_dtype,
        )
        # The last step's sampled ids on this device: the next step's pending input tokens
        # (asynchronous scheduling) are read from here. Rank 0 sets it after sampling; the
        # other ranks receive it from rank 0 when the step says so (`share_samples`).
        self.last_sampled: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None
        self._staged: torch.cuda.Event | None = None  # the last copy out of _staging
        self.model = self._build_model(folder)
        self.kv_scales = self._attach_kv_scales()
        # calculate_kv_scales: the first step sets the scales, then they stay fixed.
        self.calibrating = self.kv_scales is not None and config.calculate_kv_scales
        self.lora = self.lora_timing = None
        if config.enable_lora:
            self.lora_timing = LoRATiming(device) if lora_switches.timing() else None
            # Fusion unset ("auto"): on CUDA only; on the CPU it would drop the packed
            # matmul's weight panels for no saved launch.
            lora_switches.lora_settings()  # a bad NOVAINFER_LORA_* value fails here, not mid-step
            fusion = lora_switches.qkv_fusion()
            fusion = "off" if fusion == "auto" and device.type != "cuda" else fusion
            self.lora = attach_lora(self.model, config.max_loras, config.max_lora_rank,
                                    fusion, self.lora_timing)
            if self.lora_timing is not None and tp.rank == 0:
                timing = self.lora_timing
                atexit.register(lambda: timing.calls and timing.report())
        self.adapt_cpu_threads = cpu_thread_control(device)  # novainfer/threads.py
        capture = (
            device.type == "cuda"
            and not config.enforce_eager
            and (not config.enable_lora or lora_switches.capturable())
            and getattr(self.backend, "supports_cuda_graphs", False)
        )
        # The largest prefill step replayed from a graph (0: none); its graphs' memory is
        # kept out of the KV cache's share. One rank only for now: with tensor parallelism
        # the graphs would hold the prefill's all-reduces, not yet run on two GPUs.
        self.prefill_graph_tokens = 0
        if capture and not tp.enabled and getattr(self.backend, "supports_prefill_graphs", False):
            tokens = prefill_graph_tokens(os.environ.get("NOVAINFER_PREFILL_GRAPH_TOKENS"))
            tokens = min(tokens, config.max_num_batched_tokens or 0)
            self.prefill_graph_tokens = tokens if tokens >= MIN_PREFILL_BUCKET else 0
        # This rank's copy of the driver's block tables (engine/block_tables.py).
        self.block_tables = new_device_tables(
            config.max_num_seqs, -(-max_model_len // self.block_size), device
        )
        # Every rank must hold the same number of blocks: the driver's block ids index all.
        self.num_blocks = tp.min_over_ranks(self._num_kv_blocks())
        self.kv_cache = torch.zeros(
            cfg.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim,
            dtype=self.kv_dtype, device=device,
        )
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if capture:
            # Scratch for the largest decode split count, so replays never see a reallocation.
            self.backend.reserve_workspace(
                config.max_num_seqs, self.num_heads, cfg.head_dim, MAX_DECODE_SPLITS, device
            )
            blocks_per_seq = -(-max_model_len // self.block_size)
            pool = None
            if self.prefill_graph_tokens:  # first: the largest graphs, whose pool all share
                self.prefill_graphs = PrefillGraphs(
                    self.model, self.kv_cache, self.prefill_graph_tokens, blocks_per_seq,
                    max_model_len, cfg.hidden_size, self.dtype, device,
                )
                pool = self.prefill_graphs.pool()
            # Whole-step graphs (LM head and sampling inside) for small batches: one rank
            # only (the LM head's gather to rank 0 is outside the graphs), no LoRA.
            sample_seqs = 0
            if not tp.enabled and not config.enable_lora:
                sample_seqs = sample_graph_seqs(os.environ.get("NOVAINFER_SAMPLE_GRAPH_SEQS"))
            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, config.max_num_seqs, blocks_per_seq, max_model_len,
                cfg.hidden_size, self.dtype, device, self.lora, config.max_loras, pool,
                self.model.compute_logits, sample_seqs,
            )
        # On CUDA the LM head of the sampled rows (not the prompt-logprob rows) runs at a
        # few row counts, each called once here. In the bench's prefill steps cuBLAS held
        # the host 10-16 ms (under the profiler; ~5 ms by cProfile) at each row count it
        # had not met, with a lazy kernel load (one H200, 2026-12-03, docs/performance.md).
        # The same counts with and without CUDA graphs keep the tokens equal.
        self.logit_rows = bucket_sizes(config.max_num_seqs) if device.type == "cuda" else []
        self._warm_logit_rows()

    def _build_model(self, folder: Path) -> torch.nn.Module:
        cfg = self.model_config
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_class(cfg)(cfg, self.max_model_len, self.backend, self.tp)
        finally:
            torch.set_default_dtype(previous)
        if self.config.load_format == "dummy":
            init_dummy_weights(model, self.config.seed + self.tp.rank)
        else:
            load_weights(model, folder, cfg.tie_word_embeddings)
        model.eval()
        if self.device.type == "cpu":
            pack_cpu_weights(model)
        return model

    def _attach_kv_scales(self) -> torch.Tensor | None:
        """An fp8 cache's per-layer K and V scales: one float32 [layers, 2] tensor of ones on
        the device (CUDA graphs read it in place), each attention layer holding its row."""
        if self.kv_dtype == self.dtype:
            return None
        layers = [m for m in self.model.modules() if isinstance(m, SelfAttention)]
        scales = torch.ones(len(layers), 2, dtype=torch.float32, device=self.device)
        for layer, row in zip(layers, scales):
            layer.kv_scales = row
        return scales

    # -- KV cache size ------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return cfg.num_layers * 2 * self.block_size * self.num_kv_heads * cfg.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            blocks = self._profile_gpu_blocks()
        else:
            budget = self.config.kv_cache_memory or CPU_DEFAULT_KV_BYTES
            blocks = budget // self.kv_bytes_per_block()
        needed = -(-self.max_model_len // self.block_size)
        if blocks < needed:
            raise ValueError(
                f"the KV cache holds {blocks} blocks of {self.block_size} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs ({needed}); raise "
                "kv_cache_memory / gpu_memory_utilization / num_kv_blocks or lower max_model_len"
            )
        return blocks

    def _profile_gpu_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization after a forward pass at the largest batch
        and the prefill graphs' memory pool (estimated from the same pass: its activations,
        scaled to the largest prefill graph's tokens)."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = self.config.max_num_batched_tokens or 1
        cfg = self.model_config
        probe_blocks = -(-tokens // self.block_size)
        probe = torch.zeros(
            cfg.num_layers, 2, probe_blocks, self.block_size, self.num_kv_heads, cfg.head_dim,
            dtype=self.kv_dtype, device=self.device,
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
        before = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            # Positions wrap at max_model_len (the rotary table's size); memory use is the same.
            positions = torch.arange(tokens, device=self.device) % self.max_model_len
            hidden = self.model(ids, positions, probe, meta)
            self.model.compute_logits(hidden[-min(tokens, self.config.max_num_seqs):])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        graph_pool = (peak - before) * min(1.0, self.prefill_graph_tokens / tokens)
        del probe, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * self.config.gpu_memory_utilization - peak - graph_pool)
        return max(budget // self.kv_bytes_per_block(), 0)

    # -- a step -------------------------------------------------------------------------------

    def inputs(self, header: np.ndarray, data: np.ndarray) -> StepInputs:
        return unpack_step(header, data, self._upload, self.block_tables, self.last_sampled)

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy through a reused pinned buffer (no per-step allocation).
        The copy is asynchronous and a step that samples nothing (a prompt chunk) never
        waits for the GPU, so the buffer is refilled only once the previous copy has read
        it: otherwise a step queued behind a long prefill would read the next step's data."""
        t = torch.from_numpy(host)
        if self.device.type != "cuda":
            return t
        if self._staged is None:
            self._staged = torch.cuda.Event()
        else:
            self._staged.synchronize()  # normally done long ago: the GPU is past that copy
        if self._staging is None or self._staging.numel() < t.numel():
            self._staging = torch.empty(max(t.numel(), 1 << 20), dtype=torch.int64).pin_memory()
        staging = self._staging[: t.numel()]
        staging.copy_(t)
        uploaded = staging.to(self.device, non_blocking=True)
        self._staged.record(torch.cuda.current_stream(self.device))
        return uploaded

    def load_lora(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Put an adapter's weights (this rank's shard) in a device slot."""
        load_slot(self.model, slot, adapter)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        self.adapt_cpu_threads()
        if self.lora is not None:
            self.lora.batch = inputs.lora
        if self.calibrating:
            return self._calibrate(inputs)
        meta = inputs.meta
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(inputs.input_ids, inputs.positions, meta, inputs.lora)
        prefill = self.prefill_graphs
        if (prefill is not None and inputs.lora is None
                and prefill.can_run(meta, inputs.input_ids.shape[0])):
            return prefill.run(inputs.input_ids, inputs.positions, meta)
        return self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)

    def can_sample_in_graph(self, inputs: StepInputs, num_sampling: int) -> bool:
        """Whether this step can run as one whole-step graph (`forward_sampled`): a decode
        step of a small batch where every row samples, no adapter, no prompt logprobs."""
        graphs = self.graphs
        return (graphs is not None and not self.calibrating and inputs.lora is None
                and num_sampling == inputs.meta.num_seqs and inputs.prompt_indices.numel() == 0
                and graphs.can_sample(inputs.meta))

    def forward_sampled(
        self, inputs: StepInputs, mode: str, scale: torch.Tensor | None, u: torch.Tensor | None
    ) -> torch.Tensor:
        """The sampled ids of a step `can_sample_in_graph` accepted (engine/sampler.py,
        `sample_plain`), from one replay of its whole-step graph."""
        return self.graphs.run_sampled(inputs.input_ids, inputs.positions, inputs.meta, mode,
                                       scale, u)

    def _calibrate(self, inputs: StepInputs) -> torch.Tensor:
        """The first step, eager (never a CUDA graph): every layer sets its scales from the
        K/V it stores (the max over the ranks, models/decoder.py), then they stay fixed."""
        inputs.meta.calibrate_kv_scales = True
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        self.calibrating = False
        return hidden

    def prompt_logits(self, hidden: torch.Tensor, inputs: StepInputs) -> Iterator[torch.Tensor | None]:
        """Logits of the prompt-logprob rows, PROMPT_LOGPROBS_ROWS at a time (rank 0; the
        other ranks get None for each chunk, after taking part in its gather)."""
        rows = inputs.prompt_indices
        for lo in range(0, rows.numel(), PROMPT_LOGPROBS_ROWS):
            yield self.model.compute_logits(hidden[rows[lo : lo + PROMPT_LOGPROBS_ROWS]])

    def sample_logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor | None:
        """Logits of the rows that sample (rank 0), or None (no such rows / other ranks).
        The LM head runs on `padded_rows` rows; the padding repeats the step's hidden row 0
        and its logits are dropped."""
        rows = inputs.logits_indices
        n = rows.numel()
        if n == 0:
            return None
        size = padded_rows(n, self.logit_rows)
        if size > n:
            rows = torch.nn.functional.pad(rows, (0, size - n))
        logits = self.model.compute_logits(hidden[rows])
        return None if logits is None else logits[:n]

    @torch.inference_mode()
    def _warm_logit_rows(self) -> None:
        """One LM head call at each of `logit_rows` (every rank: a collective with TP)."""
        if not self.logit_rows:
            return
        hidden = torch.zeros(self.logit_rows[-1], self.model_config.hidden_size,
                             dtype=self.dtype, device=self.device)
        for rows in self.logit_rows:
            self.model.compute_logits(hidden[:rows])

    def release_graphs(self) -> None:
        """Free the CUDA graphs, before the process group they captured collectives of goes
        (NCCL's teardown waits forever on a communicator that live graphs still use)."""
        if self.graphs is not None or self.prefill_graphs is not None:
            self.graphs = self.prefill_graphs = None
            gc.collect()
            torch.cuda.synchronize(self.device)

    def run(self, header: np.ndarray, data: np.ndarray) -> None:
        """A worker rank's whole step: it takes part in every collective rank 0 runs."""
        inputs = self.inputs(header, data)
        hidden = self.forward(inputs)
        for _ in self.prompt_logits(hidden, inputs):
            pass
        self.sample_logits(hidden, inputs)
        num_sampled = int(header[SAMPLED])
        if header[SHARE] and num_sampled:
            tokens = torch.empty(num_sampled, dtype=torch.int64, device=self.device)
            self.share_samples(tokens)

    def share_samples(self, tokens: torch.Tensor) -> None:
        """Rank 0's sampled ids to every rank (a broadcast on the device, queued behind the
        step), kept as `last_sampled` for the next step's pending input tokens."""
        self.last_sampled = self.tp.broadcast_from_first(tokens)


SAMPLED, SHARE = HEADER.index("num_sampled"), HEADER.index("share_sampled")


def pack_cpu_weights(model: torch.nn.Module) -> None:
    """Give every linear layer (and the LM head) its CPU matmul on a repacked weight, which
    replaces the weight in every module sharing it (a tied embedding too)."""
    sharing: dict[int, list[CpuPackable]] = {}
    for module in model.modules():
        if isinstance(module, CpuPackable):
            sharing.setdefault(id(module.weight), []).append(module)
    for modules in sharing.values():
        pack_for_cpu(modules)
