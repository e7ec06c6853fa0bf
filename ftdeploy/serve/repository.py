"""What the server serves: one ONNX file, or a model repository of several models with versions.

A repository is laid out as Triton and OpenVINO Model Server lay theirs out::

    REPO/<model>/<version>/model.int8.onnx   (served when present)
    REPO/<model>/<version>/model.onnx        (else this one)

A version is a directory named by a positive integer (an export directory copied in works as it is);
folders whose names start with a dot are ignored, so a version can be staged beside the others and
renamed into place. The version policy keeps the ``latest N`` versions that loaded and passed their
check, or ``all``. With ``poll_seconds``, the repository is read again that often: a version
directory is loaded once it is complete (renamed into place after its files were written, or
unchanged over two polls), then warmed and checked (:meth:`~ftdeploy.onnx_model.OnnxModel.check_answers`),
and only then takes traffic; the versions the policy no longer keeps finish what they hold and are
unloaded. A version that fails is refused with one log line, and what was serving keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import FtdeployError, RequestError
from ..onnx_model import OnnxModel
from .batching import MicroBatcher

log = logging.getLogger(__name__)

MODEL_FILES = ("model.int8.onnx", "model.onnx")  # the first one present is served


@dataclass(frozen=True)
class VersionPolicy:
    """``latest:N`` (the N highest-numbered versions that loaded) or ``all``."""

    latest: int | None = 1  # None: all

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        """>>> VersionPolicy.parse("latest:2"), VersionPolicy.parse("all")
        (VersionPolicy(latest=2), VersionPolicy(latest=None))
        """
        kind, _, count = text.partition(":")
        if kind == "all" and not count:
            return cls(None)
        if kind == "latest" and (not count or (count.isdigit() and int(count) >= 1)):
            return cls(int(count or 1))
        raise FtdeployError(f"--version-policy {text!r} is not a version policy", "use latest:N (N >= 1) or all")

    def keep(self, numbers) -> list[int]:
        ordered = sorted(numbers, reverse=True)
        return ordered if self.latest is None else ordered[:self.latest]

    def __str__(self) -> str:
        return "all" if self.latest is None else f"latest:{self.latest}"


@dataclass(eq=False)
class Version:
    """One loaded version: its session, its micro-batcher and what it answers about itself."""

    model: str
    number: int
    path: Path
    onnx: OnnxModel
    batcher: MicroBatcher
    info: dict[str, Any]
    active: int = 0  # requests holding it, from routing to their answer
    unloading: bool = False

    @property
    def name(self) -> str:
        return str(self.number)

    async def drain_and_stop(self, poll: float = 0.02) -> None:
        """Wait until the requests that hold this version have their answers, then stop its batcher."""
        while self.active or self.batcher.pending:
            await asyncio.sleep(poll)
        await self.batcher.stop()
        log.info("unloaded %s version %d", self.model, self.number)


def model_file(folder: Path) -> Path | None:
    return next((folder / name for name in MODEL_FILES if (folder / name).is_file()), None)


def signature(folder: Path) -> tuple:
    """What a version directory holds: names, sizes and modification times of its files."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file()))
    except OSError:
        return ()


def renamed_into_place(folder: Path) -> bool:
    """Whether the directory changed (was renamed into place) after its files were last written: a
    rename updates the directory's ctime, a copy still under way writes files after it."""
    try:
        files = [e.stat().st_mtime_ns for e in os.scandir(folder) if e.is_file()]
        return bool(files) and folder.stat().st_ctime_ns > max(files)
    except OSError:
        return False


def versions_in(folder: Path) -> dict[int, Path]:
    """The version directories of one model's folder that hold a model file, by number."""
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name) if folder.is_dir() else []:
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0 and model_file(Path(entry.path)):
            found[int(entry.name)] = Path(entry.path)
    return found


@dataclass
class Repository:
    """The versions being served, by model; routing; loading, checking and the version policy.

    ``load`` (blocking: run it in a thread once the server runs) opens a version's file and checks it;
    ``activate`` (on the event loop) starts its batcher and warms it up."""

    load: Callable[[str, int, Path], Version]
    activate: Callable[[Version], Any]
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    root: Path | None = None  # None: one file, no polling
    poll_seconds: float = 0.0
    models: dict[str, dict[int, Version]] = field(default_factory=dict)  # versions taking traffic
    refused: dict[tuple[str, int], tuple[tuple, str]] = field(default_factory=dict)  # (model, version) -> (signature, why)
    seen: dict[tuple[str, int], tuple] = field(default_factory=dict)  # signatures of versions not loaded yet
    sources: dict[str, Path] = field(default_factory=dict)  # one-file mode: the file, by model name
    poller: asyncio.Task | None = None
    unloading: set = field(default_factory=set)  # the drain-and-stop tasks of versions let go (held: asyncio keeps weak ones)

    @classmethod
    def open(cls, path: str | Path, load, activate, policy: VersionPolicy, model_name: str | None = None,
             poll_seconds: float = 0.0) -> "Repository":
        """A repository over ``path`` (a repository folder, or one ONNX file served as version 1 of
        ``model_name``), its versions loaded and checked now: a server that cannot serve anything
        fails before it binds its port."""
        path = Path(path)
        if path.is_file() or path.suffix == ".onnx":
            if poll_seconds:
                raise FtdeployError("--poll-seconds needs a model repository, not one file",
                                    "serve REPO, laid out as REPO/<model>/<version>/model.onnx")
            name = model_name or path.name.split(".")[0]
            repo = cls(load, activate, policy, sources={name: path})
            repo.models[name] = {1: load(name, 1, path)}  # a bad file fails here, as it always has
            return repo
        if not path.is_dir():
            raise FtdeployError(f"{str(path)!r} is neither an ONNX file nor a model repository",
                                "pass a model.onnx, or a folder laid out as REPO/<model>/<version>/model.onnx")
        repo = cls(load, activate, policy, root=path, poll_seconds=poll_seconds)
        for name, versions in repo.scan().items():
            for number in sorted(versions, reverse=True):
                if repo.policy.latest is not None and len(repo.models.get(name, {})) >= repo.policy.latest:
                    break
                if version := repo.try_load(name, number, versions[number]):
                    repo.models.setdefault(name, {})[number] = version
        if not any(repo.models.values()):
            refused = "; ".join(f"{m}/{v}: {why}" for (m, v), (_, why) in repo.refused.items())
            raise FtdeployError(f"no version in the repository {path} could be served"
                                + (f" ({refused})" if refused else " (no <model>/<version>/model.onnx in it)"),
                                "lay it out as REPO/<model>/<version>/model.onnx with export directories")
        return repo

    def scan(self) -> dict[str, dict[int, Path]]:
        if self.root is None:
            return {}
        return {entry.name: versions_in(Path(entry.path)) for entry in sorted(os.scandir(self.root), key=lambda e: e.name)
                if entry.is_dir() and not entry.name.startswith(".")}

    def try_load(self, name: str, number: int, folder: Path) -> Version | None:
        """Load and check one version (blocking), not yet routed to; a failure is refused with one log line."""
        try:
            version = self.load(name, number, model_file(folder))
        except FtdeployError as e:
            self.refused[(name, number)] = (signature(folder), str(e))
            log.error("refused %s version %d: %s", name, number, e)
            return None
        self.seen.pop((name, number), None)
        self.refused.pop((name, number), None)
        return version

    # --- routing -------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> Version:
        """The version a request names (``None``: the highest-numbered one serving); 404 otherwise."""
        versions = self.models.get(name)
        if versions is None:
            raise RequestError(404, "model_not_found", f"model {name!r} is not served here (models: "
                               f"{', '.join(sorted(self.models)) or 'none'})")
        if version is None or version == "":
            if not versions:
                raise RequestError(503, "unavailable", f"model {name!r} has no version ready")
            return versions[max(versions)]
        if not version.isdigit() or int(version) not in versions:
            refused = self.refused.get((name, int(version))) if version.isdigit() else None
            raise RequestError(404, "version_not_found", f"version {version!r} of model {name!r} is not loaded (loaded: "
                               f"{', '.join(str(v) for v in sorted(versions)) or 'none'})"
                               + (f"; it was refused: {refused[1]}" if refused else ""))
        return versions[int(version)]

    def only(self) -> str:
        """The name of the repository's only model; a 400 that lists them when there are several."""
        if len(self.models) == 1:
            return next(iter(self.models))
        raise RequestError(400, "model_required", f"this server serves {len(self.models)} models "
                           f"({', '.join(sorted(self.models))}): name one, as /v1/models/{{model}}/predict")

    def serving(self) -> list[Version]:
        return [v for versions in self.models.values() for v in versions.values()]

    def index(self) -> list[dict[str, Any]]:
        """Every version the repository holds, as Triton's repository index lists them."""
        rows = [{"name": v.model, "version": v.name, "state": "READY"} for v in self.serving()]
        rows += [{"name": m, "version": str(n), "state": "UNAVAILABLE", "reason": why}
                 for (m, n), (_, why) in self.refused.items()]
        return sorted(rows, key=lambda r: (r["name"], int(r["version"])))

    # --- the event loop side --------------------------------------------------------------------
    async def start(self) -> None:
        for version in self.serving():
            await self.activate(version)
        if self.poll_seconds:
            self.poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self.poller:
            self.poller.cancel()
            await asyncio.gather(self.poller, return_exceptions=True)
        for version in self.serving():
            await version.batcher.stop()
        await asyncio.gather(*self.unloading, return_exceptions=True)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll()
            except Exception:  # a poll that fails must not stop the next ones (or the server)
                log.exception("reading the repository %s failed", self.root)

    async def poll(self) -> None:
        """Read the repository once: load the complete new versions the policy wants, one by one
        (loaded and checked in a thread, warmed on the loop, then routed to), and unload those it no
        longer keeps or whose directories are gone."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self.scan)
        for name, versions in found.items():
            serving = self.models.get(name, {})
            for number in sorted(set(versions) - set(serving), reverse=True):
                if number not in self.policy.keep({*serving, number}) or not self._complete(name, number, versions[number]):
                    continue
                version = await loop.run_in_executor(None, self.try_load, name, number, versions[number])
                if version is None:
                    continue
                await self.activate(version)  # warmed before it is routed to
                serving = self.models.setdefault(name, {})
                serving[number] = version
                log.info("serving %s version %d (%s)", name, number, version.path)
        for name, versions in self.models.items():  # what the policy no longer keeps, or what was removed
            keep = set(self.policy.keep(set(versions) & set(found.get(name, {}))))
            for number in [n for n in versions if n not in keep]:
                self._unload(versions.pop(number))

    def _complete(self, name: str, number: int, folder: Path) -> bool:
        """Whether a version directory not loaded yet is complete: renamed into place after its
        files were written, or unchanged since the last poll. A refused one is tried again only
        once it has changed."""
        sig = signature(folder)
        if (name, number) in self.refused and self.refused[(name, number)][0] == sig:
            return False
        previous = self.seen.get((name, number))
        self.seen[(name, number)] = sig
        return previous == sig or (previous is None and renamed_into_place(folder))

    def _unload(self, version: Version) -> None:
        version.unloading = True
        log.info("unloading %s version %d (policy %s)", version.model, version.number, self.policy)
        task = asyncio.get_running_loop().create_task(version.drain_and_stop())
        self.unloading.add(task)
        task.add_done_callback(self.unloading.discard)
