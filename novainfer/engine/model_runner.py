"""The driver's side of a model step: pack it, hand it to every rank, sample on rank 0.

Rank 0's `ModelWorker` (engine/worker.py) lives in this process and owns the weights, the
KV cache and the CUDA graphs of its shard; with `tensor_parallel_size` > 1 the other ranks
are worker processes (distributed/workers.py) that receive each packed step and run it in
lockstep. Step metadata (input ids, positions, slot mapping, block tables, sequence
lengths) is built once per step on the host (engine/step_inputs.py), copied to each device
once, and handed to the model explicitly.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from novainfer.config import EngineConfig
from novainfer.distributed import peer_allreduce
from novainfer.distributed.parallel import TensorParallel, check_shapes
from novainfer.distributed.workers import (
    Launch,
    WorkerFailed,
    Workers,
    abort_groups,
    free_port,
    join_group,
    rank_device,
    send_lora,
    send_step,
    stop_ranks,
    torchrun_rank,
)
from novainfer.engine.sampler import (
    Samples,
    inverse_temperatures,
    logprob_entries,
    plain_sampling,
    sample_tensors,
    to_device,
    uniforms,
    widened,
)
from novainfer.engine.scheduler import ScheduledBatch
from novainfer.engine.sequence import Sequence
from novainfer.engine.step_inputs import HostStep, PromptLogprobRows, StepInputs, pack_step
from novainfer.engine.worker import ModelWorker
from novainfer.lora.adapter import LoRAAdapter
from novainfer.models.config import ModelConfig
from novainfer.outputs import PositionLogprobs

FAILURE_GRACE_S = 5.0  # how long a failed collective waits for the monitor to name the rank


@dataclass
class StepOutput:
    """The sequences that sampled, their new tokens and logprobs, and the prompt logprobs
    computed this step (sequence, the entries for its next prompt positions)."""

    seqs: list[Sequence]
    tokens: list[int]
    logprobs: list[PositionLogprobs | None]
    prompt_logprobs: list[tuple[Sequence, list[PositionLogprobs]]]


@dataclass
class LaunchedStep:
    """A step queued on the device: its packed inputs, its samples on the device, their
    host copies (filled behind the step) and the event that marks them done."""

    host: HostStep
    samples: Samples | None
    tokens: torch.Tensor | None  # int64 [sampled rows], host
    table: torch.Tensor | None  # the logprob table, host
    done: torch.cuda.Event | None  # None on the CPU: everything above is already there
    prompt_logprobs: list[tuple[Sequence, list[PositionLogprobs]]]


def _to_host(samples: Samples | None, device: torch.device) -> tuple:
    """(tokens, table, done): host copies of the samples queued behind the step on CUDA, with
    the event that marks them complete; on the CPU the tensors themselves and no event."""
    tokens = None if samples is None else samples.tokens
    table = None if samples is None else samples.logprob_table
    if device.type != "cuda":
        return tokens, table, None
    copies = []
    for t in (tokens, table):
        if t is not None:
            pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            t = pinned.copy_(t, non_blocking=True)
        copies.append(t)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    return copies[0], copies[1], done


def launch_for(config: EngineConfig) -> Launch:
    """How this engine's ranks meet: torchrun's variables when present, else a local port."""
    size = config.tensor_parallel_size
    device = config.torch_device()
    peer_allreduce.setting()  # a bad NOVAINFER_ALLREDUCE fails here, before any rank starts
    peer_allreduce.fused_setting()  # and a bad NOVAINFER_FUSED_ALLREDUCE_NORM
    external = torchrun_rank(size) is not None
    return Launch(
        size=size,
        init_method="env://" if external else f"tcp://127.0.0.1:{free_port()}",
        backend="nccl" if device.type == "cuda" else "gloo",
        base_device=device,
    )


class ModelRunner:
    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, folder: Path, max_model_len: int
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.block_size = config.block_size
        self.workers: Workers | None = None
        self.tp = tp = TensorParallel()
        device = config.torch_device()
        # torch's thread count is process-wide and the CPU path changes it (a rank's share of
        # the cores, the free-core control of novainfer/threads.py): shutdown gives it back.
        self._cpu_threads = torch.get_num_threads() if device.type == "cpu" else None
        if config.tensor_parallel_size > 1:
            check_shapes(model_config, config.tensor_parallel_size)
            launch = launch_for(config)
            if torchrun_rank(launch.size) is None:
                self.workers = Workers(launch, config, model_config, folder, max_model_len)
            try:
                tp = join_group(launch, 0)
            except BaseException:
                self.shutdown()
                raise
            device = rank_device(launch, 0)
            if self.workers is not None:
                self.workers.tp = tp
        self.tp = tp
        try:
            self.worker = ModelWorker(config, model_config, folder, max_model_len, tp, device)
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException as exc:
            self._fail(exc)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.step_timer = None  # set by LLMEngine.enable_step_timing: phase marks below

    # Rank 0's shard, for the engine, the tools and the tests.
    device = property(lambda self: self.worker.device)
    dtype = property(lambda self: self.worker.dtype)
    model = property(lambda self: self.worker.model)
    kv_cache = property(lambda self: self.worker.kv_cache)
    graphs = property(lambda self: self.worker.graphs)
    backend = property(lambda self: self.worker.backend)
    num_blocks = property(lambda self: self.worker.num_blocks)

    def load_lora(self, slot: int, adapter: LoRAAdapter) -> None:
        """An adapter into a device slot on every rank (queued before the next step that uses
        it); the other ranks get rank 0's checked weights, each keeps its shard."""
        if self.tp.enabled:
            send_lora(self.tp, slot, adapter)
        self.worker.load_lora(slot, adapter)

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Rank 0's inputs for a batch (single-rank use: tools and tests)."""
        if self.tp.enabled:  # the other ranks would miss the step's block-table entries
            raise RuntimeError("ModelRunner.prepare runs one rank only; use launch with "
                               "tensor parallelism")
        host = pack_step(batch, self.block_size, lora=self.config.enable_lora)
        inputs = self.worker.inputs(host.header, host.data)
        batch.block_tables.taken()
        return inputs

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, eos_ids: list[int]) -> StepOutput:
        """Run one step and wait for it: the forward pass, prompt logprobs, sampling."""
        return self.collect(self.launch(batch, eos_ids))

    @torch.inference_mode()
    def launch(
        self, batch: ScheduledBatch, eos_ids: list[int], share_samples: bool = False
    ) -> LaunchedStep:
        """Queue one step on the device(s) and return without waiting for it (prompt
        logprobs excepted: they are read at once). The sampled ids go to pinned host memory
        behind the step; `collect` reads them. Pending input tokens (a decode whose token the
        step before samples) are read on the device. `share_samples`: every rank keeps this
        step's sampled ids, because the next step may be packed before they reach the host."""
        if self.workers is not None:
            self.workers.check()
        try:
            host = pack_step(batch, self.block_size, share_samples and self.tp.enabled,
                             self.config.enable_lora)
            if self.tp.enabled:
                send_step(self.tp, host.header, host.data)
            worker = self.worker
            inputs = worker.inputs(host.header, host.data)
            batch.block_tables.taken()  # every rank has the step's table entries
            timer = self.step_timer
            if timer is not None:
                timer.phase("forward")
            # the batch-shape test first: large steps never scan their rows' settings here
            mode = None
            if worker.can_sample_in_graph(inputs, len(host.sampling_seqs)):
                mode = plain_sampling(host.sampling_seqs)
            if mode is not None:
                samples = self._sample_in_graph(inputs, host.sampling_seqs, mode)
                return LaunchedStep(host, samples, *_to_host(samples, self.device), [])
            hidden = worker.forward(inputs)
            if host.prompt_rows:
                self._wait_for_gpu()
            prompt_logprobs = self._prompt_logprobs(hidden, inputs, host.prompt_rows)
            logits = worker.sample_logits(hidden, inputs)
            samples = None
            if host.sampling_seqs:
                if timer is not None:
                    timer.phase("sample")
                samples = sample_tensors(logits, host.sampling_seqs, eos_ids, self.generator)
                worker.last_sampled = samples.tokens
                if share_samples and self.tp.enabled:
                    worker.share_samples(samples.tokens)
            return LaunchedStep(host, samples, *_to_host(samples, self.device), prompt_logprobs)
        except Exception as exc:
            if self.workers is None:
                raise
            self._fail(exc)

    def _sample_in_graph(self, inputs: StepInputs, seqs: list[Sequence], mode: str) -> Samples:
        """A small decode step as one replay of its whole-step graph: the forward pass, the
        LM head and the sampler (engine/cuda_graphs.py). The uniforms come from the same
        generators, in the same order, as `sample_tensors` draws them, so the tokens are the
        ones the eager sampler gives."""
        scale = u = None
        if mode == "draw":
            scale = inverse_temperatures(seqs, self.device)
            u = uniforms(seqs, self.generator, self.device)
        tokens = self.worker.forward_sampled(inputs, mode, scale, u)
        self.worker.last_sampled = tokens
        return Samples(tokens, None, [], [])

    def collect(self, step: LaunchedStep) -> StepOutput:
        """Wait for a launched step and bring its samples to the host."""
        try:
            self._wait_for_gpu(step.done)
            samples = step.samples
            if samples is None:
                return StepOutput([], [], [], step.prompt_logprobs)
            table = step.table.tolist() if step.table is not None else None
            tokens = step.tokens.tolist()
        except Exception as exc:
            if self.workers is None:
                raise
            self._fail(exc)
        return StepOutput(step.host.sampling_seqs, tokens, samples.host_logprobs(table),
                          step.prompt_logprobs)

    def _wait_for_gpu(self, done: torch.cuda.Event | None = None) -> None:
        """Wait for the GPU work queued so far (or up to `done`). With the peer-to-peer
        all-reduce, wait by polling while watching the workers: its barrier kernels cannot be
        aborted like NCCL, so a blocking wait would never return after a worker died. On a
        failure, abort NCCL, release the barriers (distributed/peer_allreduce.py) and raise
        WorkerFailed."""
        if self.device.type != "cuda":
            return
        if done is None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        peer = self.tp.peer
        if self.workers is None or peer is None:
            done.synchronize()
            return
        while not done.query():
            if self.workers.failure is not None:
                abort_groups()
                if not peer.release(done.query, timeout=FAILURE_GRACE_S):
                    sys.stderr.write("novainfer: rank 0's GPU work did not drain after the "
                                     "worker failure; its GPU stays busy until exit\n")
                self.workers.check()
            time.sleep(0)  # lets other Python threads (the server) run

    def _prompt_logprobs(
        self, hidden: torch.Tensor, inputs: StepInputs, rows: list[PromptLogprobRows]
    ) -> list[tuple[Sequence, list[PositionLogprobs]]]:
        """Entries for the prompt positions computed this step, in `rows`' order; the logits
        come in chunks (every rank takes part in each chunk's gather)."""
        targets: list[int] = []
        ks: list[int] = []
        for r in rows:
            targets += r.seq.token_ids[r.first + 1 : r.first + 1 + r.count]
            ks += [r.seq.params.prompt_logprobs] * r.count
        entries: list[PositionLogprobs] = []
        for logits in self.worker.prompt_logits(hidden, inputs):
            lo, n = len(entries), logits.shape[0]
            chosen = to_device(targets[lo : lo + n], logits.device)
            entries += logprob_entries(widened(logits).log_softmax(dim=-1), chosen, ks[lo : lo + n])
        out, lo = [], 0
        for r in rows:
            out.append((r.seq, entries[lo : lo + r.count]))
            lo += r.count
        return out

    def _fail(self, exc: BaseException) -> None:
        """Shut the workers down and raise: WorkerFailed naming the rank when a worker
        failed (the monitor may need a moment to see it), else the original error."""
        failure = None
        if self.workers is not None:
            grace = 0 if isinstance(exc, KeyboardInterrupt) else FAILURE_GRACE_S
            failure = self.workers.wait_failure(grace)
        self.shutdown()
        if failure is not None:
            raise WorkerFailed(failure) from exc
        raise exc

    def shutdown(self) -> None:
        """Stop the other ranks (tensor parallelism) and restore torch's CPU thread count.
        Idempotent."""
        if self._cpu_threads is not None:
            torch.set_num_threads(self._cpu_threads)
        failed = self.workers is not None and self.workers.failure is not None
        if self.tp.enabled and hasattr(self, "worker") and not failed:
            self.worker.release_graphs()
        if self.workers is not None:
            self.workers.shutdown()
        elif self.tp.enabled and torch.distributed.is_initialized():  # ranks from torchrun
            stop_ranks(self.tp)
