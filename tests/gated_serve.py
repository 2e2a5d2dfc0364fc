"""`novainfer serve` with a gate, for tests that need a request that cannot finish.

After NOVAINFER_TEST_HOLD_AFTER engine steps, and for as long as the file named by
NOVAINFER_TEST_HOLD exists, the engine core idles instead of stepping: running requests
make no progress, but commands (add, abort, stop) are still applied. The test removes the
file to let them finish. Nothing here depends on how fast the machine is. The engine core
process is spawned from this file as its main module, so the gate is installed there too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from novainfer.cli import main
from novainfer.engine.llm_engine import LLMEngine

GATE = Path(os.environ["NOVAINFER_TEST_HOLD"])
AFTER = int(os.environ.get("NOVAINFER_TEST_HOLD_AFTER", "0"))
_advance = LLMEngine.advance


def gated_advance(self: LLMEngine):
    if self.num_steps >= AFTER and GATE.exists():
        time.sleep(0.005)
        return None
    return _advance(self)


LLMEngine.advance = gated_advance

if __name__ == "__main__":
    sys.exit(main())
