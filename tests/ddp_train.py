"""Worker of tests/test_train_scale.py: a short fine-tune of a tiny timm model on digits.

Run it under torchrun (``python -m torch.distributed.run --standalone --nproc_per_node 2
tests/ddp_train.py OUT``) to train with DDP on CPU (gloo). Every rank writes
``OUT/rank<r>.json`` with the SHA-256 of its final weights, its training report and the epochs its
``on_epoch_end`` callback saw; rank 0 also writes ``OUT/initial.sha256`` (the weights before
training).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

import torch  # noqa: E402
from agentprune import data, distributed, models, train  # noqa: E402
from agentprune.settings import DataSettings  # noqa: E402
from conftest import recipe  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

DIGITS = DataSettings(
    name="digits",
    root=None,
    img_size=32,
    val_fraction=0.15,
    test_fraction=0.25,
    split_seed=0,
    synthetic_classes=10,
    synthetic_samples=256,
    max_val_images=10000,
)


def weights_sha(model: nn.Module) -> str:
    """SHA-256 over every tensor of ``model``'s state, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    info = distributed.init_from_env()
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = models.create(
        "deit_tiny_patch16_224",
        10,
        {
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 1,
            "num_heads": 2,
            "mlp_ratio": 2,
        },
    )
    initial = weights_sha(model)
    train_set = Subset(data.load_splits(DIGITS).train, range(256))
    cfg = recipe(epochs=2, lr=3e-3, batch_size=64, label_smoothing=0.0)
    epochs_ended: list[int] = []  # on_epoch_end is rank 0's alone
    report = train.train(
        model, train_set, cfg, seed=0, progress=False, log=print, on_epoch_end=epochs_ended.append
    )
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (out / "initial.sha256").write_text(initial)
    (out / f"rank{info.rank}.json").write_text(
        json.dumps(
            {
                "sha256": weights_sha(model),
                "report": report,
                "pid": os.getpid(),
                "epochs_ended": epochs_ended,
            }
        )
    )
    distributed.barrier(info)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
