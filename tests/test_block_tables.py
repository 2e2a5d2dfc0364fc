"""Block tables kept on every rank (engine/block_tables.py): a step sends its sequences' rows
and the entries written since the last step, never the tables themselves. The rank's copy
must equal the driver's at every step, through chunked prefill, preemption, the prefix
cache, n > 1 and aborts, and entries of a step that failed before the rank applied them
must reach it with the next step."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, make_llm, random_prompts

import novainfer.engine.model_runner as model_runner
from novainfer import SamplingParams
from novainfer.engine.block_tables import BlockTables, device_tables, new_device_tables
from novainfer.engine.step_inputs import HEADER



def _apply(copy: torch.Tensor, tables: BlockTables, rows: list[int], width: int):
    index, values = (torch.from_numpy(a) for a in tables.updates())
    return device_tables(copy, index, values, torch.tensor(rows), width)


def test_entries_keep_the_last_write_and_stay_pending_until_taken():
    tables = BlockTables(3, 4)
    tables.write(1, 0, [5, 6])
    tables.clear(1, 2)  # its sequence left; another takes the row
    tables.write(1, 0, [7])
    tables.write(2, 2, [9, 8])
    index, _ = tables.updates()
    assert sorted(index.tolist()) == [4, 5, 10, 11]  # one entry each, the last write's value
    copy = new_device_tables(3, 4, torch.device("cpu"))
    assert _apply(copy, tables, [2, 1], 3).tolist() == [[0, 0, 9], [7, 0, 0]]
    assert torch.equal(copy, torch.from_numpy(tables.host))
    assert len(tables.updates()[0]) == 4  # not taken yet: the next step sends them again
    tables.taken()
    assert len(tables.updates()[0]) == 0
    assert _apply(copy, tables, [0, 2], 4).tolist() == [[0, 0, 0, 0], [0, 0, 9, 8]]


def _checked_launches(engine) -> list[int]:
    """After every launch, the rank's copy must equal the driver's tables; returns the
    number of table entries each launch sent."""
    runner, sent = engine.runner, []
    launch, host = runner.launch, engine.block_manager.tables

    def checked(batch, *args, **kwargs):
        sent.append(len(host.updates()[0]))
        step = launch(batch, *args, **kwargs)
        assert torch.equal(runner.worker.block_tables, torch.from_numpy(host.host))
        assert len(host.updates()[0]) == 0
        return step

    runner.launch = checked
    return sent


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_rank_copy_equals_the_driver_tables_at_every_step(checkpoint, overlap):
    folder = checkpoint("llama")
    prompts = random_prompts([20, 45, 7, 33, 60, 20], seed=51)
    prompts[5] = prompts[0][:18] + [9, 9]  # shares a cached first block with prompt 0
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=9, ignore_eos=True)] * 3
    want = make_llm(folder, enable_prefix_caching=False, max_num_batched_tokens=512)
    expected = want.generate(prompts, params, use_tqdm=False)
    llm = make_llm(folder, async_scheduling=overlap, **TIGHT)
    engine = llm.llm_engine
    sent = _checked_launches(engine)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in r.outputs] for r in got] == [
        [c.token_ids for c in r.outputs] for r in expected]
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hits > 0
    assert sum(sent) > 0 and sent.count(0) > 0  # most decode steps write no entry
    # an abort frees its row mid-run; the next request's steps still see the right tables
    engine.add_request("gone", {"prompt_token_ids": prompts[1]},
                       SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("gone")
    got = llm.generate(prompts[:2], params[:2], use_tqdm=False)
    assert [r.outputs[0].token_ids for r in got] == [
        r.outputs[0].token_ids for r in expected[:2]]


def test_a_decode_step_message_does_not_grow_with_the_context(checkpoint, monkeypatch):
    """Old layout: n x max_blocks table entries in every step. Now: the rows, and entries
    only where a block was added."""
    sizes: dict[int, set[int]] = {}
    pack = model_runner.pack_step

    def recorded(batch, *args, **kwargs):
        host = pack(batch, *args, **kwargs)
        h = dict(zip(HEADER, host.header.tolist()))
        if h["num_decodes"] == h["num_seqs"] and h["table_updates"] == 0:
            sizes.setdefault(h["max_blocks"], set()).add(len(host.data))
        return host

    monkeypatch.setattr(model_runner, "pack_step", recorded)
    llm = make_llm(checkpoint("llama"), block_size=16, max_model_len=512,
                   async_scheduling=False)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for length in (20, 300):  # 2 and 19 blocks a sequence
        llm.generate(random_prompts([length] * 4, seed=52), params, use_tqdm=False)
    assert 2 in sizes and 19 in sizes, sizes
    assert sizes[2] == sizes[19] and len(sizes[2]) == 1


def test_entries_of_a_failed_step_reach_the_rank_with_the_next(checkpoint):
    folder = checkpoint("llama")
    prompts = random_prompts([30, 41], seed=53)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = make_llm(folder).generate(prompts, params, use_tqdm=False)
    llm = make_llm(folder, async_scheduling=False, block_size=16)
    engine = llm.llm_engine
    worker, host = engine.runner.worker, engine.block_manager.tables
    inputs, failed = worker.inputs, []

    def flaky(header, data):
        written = dict(zip(HEADER, header.tolist()))["table_updates"]
        if not failed and written and engine.num_steps > 2:  # a decode step adding a block
            failed.append(written)
            raise RuntimeError("injected failure before the rank applied the entries")
        return inputs(header, data)

    worker.inputs = flaky
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        try:
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
        except RuntimeError as exc:
            assert "injected" in str(exc)
            assert len(host.updates()[0]) >= failed[0]  # still pending for the next step
    assert failed
    assert [outputs[str(i)] for i in range(2)] == [r.outputs[0].token_ids for r in want]
    # the rows freed at the end reach the rank with the next step
    copy = worker.block_tables.clone()
    _apply(copy, host, [0], 1)
    assert torch.equal(copy, torch.from_numpy(host.host))


def test_single_rank_prepare_refuses_tensor_parallelism(checkpoint):
    """`ModelRunner.prepare` feeds rank 0 only: with other ranks it would take the step's
    table entries from them for good, so it refuses."""
    with make_llm(checkpoint("llama"), tensor_parallel_size=2) as llm:
        engine = llm.llm_engine
        engine.add_request("a", {"prompt_token_ids": random_prompts([9], seed=54)[0]},
                           SamplingParams(max_tokens=2))
        with pytest.raises(RuntimeError, match="one rank only"):
            engine.runner.prepare(engine.scheduler.schedule())
