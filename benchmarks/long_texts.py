"""Long texts lose no entity: every validation text in which a token classifier's file finds an entity,
put behind entity-free validation texts until it lies past the ``max_length`` cut (so a second window
reads it), must get entities back there. Counts the texts and entities answered with the same label,
characters and (shifted) offsets as when the text is sent alone; truncation would answer none.

    ftdeploy run --config configs/ner.yaml
    python benchmarks/long_texts.py runs/ner/export [--file model.int8.onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftdeploy.data import build_datasets
from ftdeploy.onnx_model import OnnxModel
from ftdeploy.rundir import load_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--file", default="model.onnx", help="the file in the export directory to ask")
    args = parser.parse_args()
    export = load_export(args.export)
    model = OnnxModel(args.export / args.file)
    codec = model.task.codec
    splits = build_datasets(export.data.model_copy(update={"augment": False, "max_train_samples": None}),
                            export.preprocessing)
    texts = list(dict.fromkeys(splits.val.raw(i) for i in range(len(splits.val))))
    answers = {t: codec.answer(model, [t])["entities"] for t in texts}
    count = lambda text: len(model.preprocessing.compiled.encode(text).ids)  # noqa: E731
    filler = ""
    plain = iter(t for t in texts if not answers[t])
    while count(filler) <= model.preprocessing.max_length:
        filler += next(plain) + " "
    same = found = total = windows = 0
    with_entities = [t for t in texts if answers[t]]
    for text in with_entities:
        long = codec.answer(model, [filler + text])["entities"]
        assert all((filler + text)[e["start"]:e["end"]] == e["text"] for e in long)
        got = {(e["label"], e["text"], e["start"] - len(filler), e["end"] - len(filler)) for e in long
               if e["start"] >= len(filler)}
        want = {(e["label"], e["text"], e["start"], e["end"]) for e in answers[text]}
        same += got == want
        found += len(got & want)
        total += len(want)
        windows += len(model.preprocess([filler + text])) > 1
    print(f"{len(with_entities)} validation texts with entities, each behind {count(filler)} tokens of entity-free "
          f"ones (read in more than one window: {windows}): the same entities as alone for {same} texts; "
          f"{found} of their {total} entities")


if __name__ == "__main__":
    main()
