"""``python -m ftdeploy.train ARGS`` is ``ftdeploy train ARGS`` (what ``accelerate launch -m`` runs)."""

import sys

from ..cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
