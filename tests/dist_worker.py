"""Launched by test_distributed.py under torchrun: trains through the library API on every rank and
records, per rank, which images it was fed and a hash of the weights it ended with (OUT/ddp); then
trains the head alone, the backbone running every step (OUT/head)."""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_config  # noqa: E402
from ftdeploy.train import train  # noqa: E402


HEAD = ["train.mode=head", "train.cache_features=false"]  # the frozen backbone runs in every step


def digest(tensor) -> str:
    return hashlib.sha1(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


class Recorder:
    def __init__(self):
        self.images: dict[int, list[str]] = {}
        self.weights = ""

    def on_train_batch(self, state, batch):
        self.images.setdefault(state.epoch + 2, []).extend(digest(img) for img in batch[0][0])  # ((images,), labels)

    def on_epoch_end(self, state):
        self.weights = hashlib.sha256("".join(digest(v) for _, v in sorted(state.model.state_dict().items())).encode()).hexdigest()


if __name__ == "__main__":
    out = Path(sys.argv[1]) / "ddp"
    recorder = Recorder()
    train(tiny_config(out, *sys.argv[2:]), callbacks=[recorder])
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({"world_size": int(os.environ["WORLD_SIZE"]),
                                                       "images": recorder.images, "weights": recorder.weights}))
    train(tiny_config(Path(sys.argv[1]) / "head", *sys.argv[2:], *HEAD))
