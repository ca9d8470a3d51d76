"""Worker of tests/test_train_scale.py: the finetune step, SIGKILLed right after an epoch.

``python tests/finetune_killed.py KWARGS.json EPOCH`` runs ``steps.finetune_worker(**kwargs)``
(the finetune step in this one process) with an ``on_epoch_end`` callback that kills this process
(SIGKILL, no clean-up, like the OOM killer or a pre-empted node) once the checkpoint of epoch
``EPOCH`` is written.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

import torch  # noqa: E402
from agentprune import steps  # noqa: E402


def kill_after(epoch: int) -> Callable[[int], None]:
    """An ``on_epoch_end`` callback that SIGKILLs this process after epoch ``epoch``."""

    def on_epoch_end(completed: int) -> None:
        if completed == epoch:
            print(f"epoch {completed} done: killing this process (test)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return on_epoch_end


def main(kwargs_json: Path, epoch: int) -> None:
    torch.set_num_threads(1)
    steps.finetune_worker(**json.loads(kwargs_json.read_text()), on_epoch_end=kill_after(epoch))
    raise SystemExit(f"the run ended without reaching epoch {epoch}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
