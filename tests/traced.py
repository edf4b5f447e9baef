"""Run a trainer with a record of the examples it trains on, for tests that check which ones:

    python tests/traced.py TRACE train_with_custom_dataset.py --dataset ...

appends the window numbers of every batch each process is given to TRACE.rank<R>, one per line."""

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import dlm_common as dlm  # noqa: E402

trace, script = sys.argv[1], sys.argv[2]
batches = dlm.TextData.batches


def traced(self, batch_size, epoch, seed, rank=0, world=1):
    with open(f"{trace}.rank{rank}", "a", buffering=1) as f:
        for batch in batches(self, batch_size, epoch, seed, rank, world):
            f.write("".join(f"{n}\n" for n in batch.numbers))
            yield batch


dlm.TextData.batches = traced
sys.argv = sys.argv[2:]
runpy.run_path(str(REPO / script), run_name="__main__")
