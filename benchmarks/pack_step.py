"""Host cost of packing one decode step (engine/step_inputs.py `pack_step`): microseconds per
call and the size of the message every rank receives, for N sequences of L tokens.

    python benchmarks/pack_step.py [--seqs 256] [--context 700] [--repeats 2000]

CPU only (no model, no device): the block manager and sequences are built directly.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from novainfer.engine.block_manager import BlockManager
    from novainfer.engine.scheduler import ScheduledBatch
    from novainfer.engine.sequence import Sequence
    from novainfer.engine.step_inputs import pack_step
    from novainfer.outputs import RequestMetrics
    from novainfer.sampling_params import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=700)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    n, length, block = args.seqs, args.context, 16
    width = -(-(length + 1) // block)  # the prompt and the token this step decodes
    manager = BlockManager(n * (width + 1), block, False, n, width)
    seqs = []
    for i in range(n):
        seq = Sequence(i, str(i), 0, list(range(length)), length, SamplingParams(), None,
                       RequestMetrics(0.0))
        manager.allocate_new(seq, length)
        seq.num_computed_tokens = length
        seq.token_ids.append(1)  # one sampled token: this step decodes it
        manager.try_append(seq, 1)
        seqs.append(seq)
    manager.tables.taken()  # a steady decode step: the ranks have every entry already
    batch = ScheduledBatch(seqs, [1] * n, manager.tables)
    for _ in range(50):
        host = pack_step(batch, block)
    start = time.perf_counter()
    for _ in range(args.repeats):
        host = pack_step(batch, block)
    us = (time.perf_counter() - start) / args.repeats * 1e6
    print(f"{n} sequences of {length} tokens: pack_step {us:.1f} us, "
          f"message {host.data.nbytes / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
