"""Tasks (a registry): what one kind of model takes in and gives out, in one object the stages call.

A task owns its input spec (names, dtypes, dynamic axes, dummy and bench inputs), its preprocessor
and how that is stored in a run directory and an ONNX file, batch collation, the parity inputs, and
what the model gives out: output names and axes, postprocessing, the metric, the losses, the parity
comparison, the server's codec and the usability suite. Stages never branch on a task's name: they
ask the task. Adding a task is one module here and one ``register`` line (or a ``register`` call
from the user's own code).

>>> get_task("image_classification").input_names
('input',)
>>> get_task("text")
Traceback (most recent call last):
...
ftdeploy.errors.ConfigError: unknown task 'text' (known: image_classification, object_detection, text_classification, token_classification)
"""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import Registry
from .base import Decisions, Outputs, Scores, Task, UsabilitySuite, feeds, tile
from .detection import ObjectDetection
from .image import ImageClassification
from .text import TextClassification
from .tokens import TokenClassification

tasks: Registry[Task] = Registry("task", ConfigError)
tasks.register(ImageClassification.name)(ImageClassification())
tasks.register(TextClassification.name)(TextClassification())
tasks.register(ObjectDetection.name)(ObjectDetection())
tasks.register(TokenClassification.name)(TokenClassification())


# what files and directories written before tasks existed hold
DEFAULT_TASK = ImageClassification.name


def get_task(name: str | None) -> Task:
    """The registered task ``name``; None (a file from before tasks) is the default, images."""
    return tasks.get(DEFAULT_TASK if name is None else name)


__all__ = ["Decisions", "Outputs", "Scores", "Task", "UsabilitySuite", "feeds", "get_task", "tasks", "tile"]
