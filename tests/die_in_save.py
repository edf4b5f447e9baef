"""Run a trainer that is killed (SIGKILL) in its first save, at a chosen point:

    python tests/die_in_save.py WHEN train_with_custom_dataset.py --dataset ...

WHEN is `written` (the new model is written in full beside the old one, not yet swapped in) or
`swapping` (between the two renames of the swap: the old folder moved aside, the new one not yet
in its place)."""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import dlm_common as dlm  # noqa: E402

when, script = sys.argv[1], sys.argv[2]


def dying_swap(self):
    if when == "swapping":
        self.path.rename(self.old)
    os.kill(os.getpid(), signal.SIGKILL)


dlm.atomic_dir.swap = dying_swap
sys.argv = sys.argv[2:]
runpy.run_path(str(REPO / script), run_name="__main__")
