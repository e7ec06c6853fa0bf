"""A name -> factory registry that refuses duplicates and lists the valid names on a miss."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import FtdeployError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind of thing.

    >>> fruits = Registry("fruit")
    >>> @fruits.register("apple")
    ... def apple():
    ...     return "an apple"
    >>> fruits.get("apple")()
    'an apple'
    >>> fruits.get("appel")
    Traceback (most recent call last):
    ...
    ftdeploy.errors.FtdeployError: unknown fruit 'appel' (did you mean 'apple'? known: apple)
    """

    def __init__(self, kind: str, error: type[FtdeployError] = FtdeployError):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> T:
        """Remove ``name`` (what a user's code registered: a task, a dataset, a model family) and return it."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}", suggest(name, self.names()))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def suggest(name: str, known: list[str], shown: int = 30) -> str:
    """A hint naming the closest known names and (some of) the valid ones."""
    close = difflib.get_close_matches(name, known, n=3)
    listed = ", ".join(known[:shown]) + (f", ... ({len(known)} in all)" if len(known) > shown else "")
    prefix = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{prefix}known: {listed}"
