"""The driver's adapters: which id names which folder, a CPU cache of loaded adapters, and
the device slots.

An adapter is read and checked (lora/adapter.py) when a request first names it, so a bad
adapter is an error of that request, before anything is queued. Loaded adapters stay in a
CPU cache of `max_cpu_loras` (least recently used out first; an evicted one is read again
from its folder when a request names it again). Adapters of requests still in the engine
are never evicted (the cache grows past max_cpu_loras if it must), so a step never reads
a folder. Each step, the adapters its batch uses get device slots
(`max_loras` of them; the scheduler never puts more distinct adapters in one step): one
already in a slot keeps it, a new one takes an empty slot or the least recently used slot
whose adapter this step does not use. Slots are rebuilt only when they change.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from novainfer.lora.adapter import LoRAAdapter, load_adapter
from novainfer.lora.request import LoRARequest
from novainfer.models.config import ModelConfig


class LoRAManager:
    def __init__(self, model: ModelConfig, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int) -> None:
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.requests: dict[int, LoRARequest] = {}  # every id seen, with its folder
        self.cpu: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slots: list[int | None] = [None] * max_loras  # adapter id per device slot
        self.slot_of: dict[int, int] = {}
        self._used: OrderedDict[int, None] = OrderedDict()  # slots, least recently used first
        self.live: dict[int, int] = {}  # adapter id -> requests in the engine that use it
        self.loads = 0  # adapters copied into a slot so far
        self.reads = 0  # adapter folders read so far

    def register(self, request: LoRARequest) -> None:
        """Accept the adapter a request names: the id must keep naming one folder, and the
        adapter must load (ValueError naming it and the field otherwise)."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        known = self.requests.get(request.lora_int_id)
        if known is not None and _same_folder(known, request):
            self.adapter(request.lora_int_id)  # read again only if it left the cache
            return
        if known is not None:
            raise ValueError(
                f"lora_int_id {request.lora_int_id} already names adapter '{known.lora_name}' "
                f"({known.lora_path}); LoRA adapter '{request.lora_name}' ({request.lora_path}) "
                "needs an id of its own")
        adapter = load_adapter(request, self.model, self.max_lora_rank)
        self.reads += 1
        self.requests[request.lora_int_id] = request
        self._cache(adapter)

    def acquire(self, lora_id: int) -> None:
        """A request using the adapter entered the engine: keep the adapter loaded."""
        self.live[lora_id] = self.live.get(lora_id, 0) + 1
        self.adapter(lora_id)

    def release(self, lora_id: int) -> None:
        """A request using the adapter left the engine."""
        left = self.live[lora_id] - 1
        if left:
            self.live[lora_id] = left
        else:
            del self.live[lora_id]
            self._evict()

    def adapter(self, lora_id: int) -> LoRAAdapter:
        """A registered adapter's weights, from the CPU cache or read again."""
        adapter = self.cpu.get(lora_id)
        if adapter is None:
            adapter = load_adapter(self.requests[lora_id], self.model, self.max_lora_rank)
            self.reads += 1
            self._cache(adapter)
        self.cpu.move_to_end(lora_id)
        return adapter

    def _cache(self, adapter: LoRAAdapter) -> None:
        self.cpu[adapter.int_id] = adapter
        self._evict(keep=adapter.int_id)

    def _evict(self, keep: int = 0) -> None:
        """Least recently used first, never an adapter a request in the engine uses (nor
        `keep`, the one just read)."""
        for lora_id in [i for i in self.cpu if i not in self.live and i != keep]:
            if len(self.cpu) <= self.max_cpu_loras:
                break
            del self.cpu[lora_id]

    def assign(self, lora_ids: set[int]) -> list[tuple[int, LoRAAdapter]]:
        """Slots for one step's adapters (at most max_loras of them); returns the (slot,
        adapter) loads to do before the step runs."""
        if len(lora_ids) > len(self.slots):
            raise RuntimeError(f"{len(lora_ids)} adapters in one step, {len(self.slots)} slots")
        new = {i: self.adapter(i) for i in sorted(lora_ids) if i not in self.slot_of}
        loads = []
        for lora_id in sorted(lora_ids):  # no read can fail from here on
            slot = self.slot_of.get(lora_id)
            if slot is None:
                slot = self._free_slot(lora_ids)
                old = self.slots[slot]
                if old is not None:
                    del self.slot_of[old]
                self.slots[slot] = lora_id
                self.slot_of[lora_id] = slot
                loads.append((slot, new[lora_id]))
                self.loads += 1
            self._used.pop(slot, None)
            self._used[slot] = None
        return loads

    def empty_slot(self, slot: int) -> None:
        """Forget what `slot` holds (its load failed: its weights are not the adapter's)."""
        old = self.slots[slot]
        if old is not None:
            del self.slot_of[old]
        self.slots[slot] = None

    def _free_slot(self, keep: set[int]) -> int:
        if None in self.slots:
            return self.slots.index(None)
        for slot in self._used:  # least recently used first
            if self.slots[slot] not in keep:
                return slot
        raise RuntimeError("no device slot is free for a LoRA adapter")


def _same_folder(a: LoRARequest, b: LoRARequest) -> bool:
    return os.path.realpath(a.lora_path) == os.path.realpath(b.lora_path)
