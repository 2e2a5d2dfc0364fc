"""The messages between the server's frontend processes and its engine core process.

One message is one pickled tuple sent with `Connection.send_bytes`; per-token data travels
as a few numpy arrays per step (plus a list of row numbers for the rows that carry logprobs),
not as one Python object per token.

Frontend -> core, a list of commands per event-loop turn:
    ("add", cid, token_ids int32 array, cache_salt, SamplingParams)
    ("abort", [cid, ...])
    ("finish", cid, completion index, stop string)   the frontend found a stop string
    ("metrics", Metrics.state())                      once a second with several frontends
    ("bye",)                                           orderly shutdown of this frontend
Core -> frontend:
    ("ready", info dict)  or  ("failed", traceback text)   once, at start
    ("step", Step)                                           after commands or a model step
`cid` is the frontend's integer id of a request; the core keys it by (frontend, cid).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from novainfer.outputs import Logprob, PositionLogprobs

# Row layout of Step.rows: one row per sampled token.
CID, INDEX, TOKEN, FINISH, STOP_TOKEN = range(5)
FINISH_CODES = {None: 0, "stop": 1, "length": 2}  # the core ends sequences on token rules
FINISH_NAMES = {v: k for k, v in FINISH_CODES.items()}


@dataclass
class PackedLogprobs:
    """Logprob entries of many positions as flat arrays: position i holds entries
    offsets[i]:offsets[i+1] (an empty range stands for None, the first prompt position)."""

    offsets: np.ndarray  # int64 [positions + 1]
    token_ids: np.ndarray  # int64 [entries]
    logprobs: np.ndarray  # float64 [entries]
    ranks: np.ndarray  # int64 [entries], -1 for None

    @staticmethod
    def pack(positions: list[PositionLogprobs | None]) -> PackedLogprobs:
        offsets, ids, values, ranks = [0], [], [], []
        for pos in positions:
            for tid, lp in (pos or {}).items():
                ids.append(tid)
                values.append(lp.logprob)
                ranks.append(-1 if lp.rank is None else lp.rank)
            offsets.append(len(ids))
        return PackedLogprobs(np.asarray(offsets, np.int64), np.asarray(ids, np.int64),
                              np.asarray(values, np.float64), np.asarray(ranks, np.int64))

    def unpack(self) -> list[PositionLogprobs | None]:
        offsets = self.offsets.tolist()
        ids, values, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        out: list[PositionLogprobs | None] = []
        for start, end in itertools.pairwise(offsets):
            out.append({ids[j]: Logprob(values[j], None if ranks[j] < 0 else ranks[j])
                        for j in range(start, end)} if end > start else None)
        return out


@dataclass
class Step:
    """What the core tells one frontend after a turn of its loop."""

    snapshot: dict[str, float]
    accepted: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str, bool]] = field(default_factory=list)  # cid, message, client
    failed: list[tuple[int, str]] = field(default_factory=list)  # cid, engine error
    rows: np.ndarray | None = None  # int64 [tokens, 5]: CID, INDEX, TOKEN, FINISH, STOP_TOKEN
    logprob_rows: list[int] = field(default_factory=list)  # rows whose position has logprobs
    logprobs: PackedLogprobs | None = None  # their entries, in that order
    prompt_logprobs: list[tuple[int, PackedLogprobs]] = field(default_factory=list)
    cached: list[tuple[int, int]] = field(default_factory=list)  # cid, prompt tokens from cache
