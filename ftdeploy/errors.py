"""Typed errors. Each carries what went wrong and how to fix it; the CLI prints one line for them."""


class FtdeployError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""

    exit_code = 2  # what the command line exits with

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(FtdeployError):
    """A config file or override is invalid."""


class DataError(FtdeployError):
    """A dataset cannot be found, read or decoded."""


class ModelError(FtdeployError):
    """A model or its weights cannot be built or loaded."""


class RunDirError(FtdeployError):
    """A run directory is missing or incomplete."""


class DependencyError(FtdeployError):
    """An optional dependency is not installed."""


class ExportError(FtdeployError):
    """A model cannot be exported to ONNX."""


class GateError(FtdeployError):
    """A validation gate failed; ``failures`` lists every failed check."""

    def __init__(self, failures: list[str], report_path: str | None = None):
        where = f"; report written to {report_path}" if report_path else ""
        super().__init__(f"{len(failures)} gate check(s) failed{where}:\n  " + "\n  ".join(failures))
        self.failures = failures


class ServiceError(FtdeployError):
    """The server stopped because it could no longer serve (not a user error: the CLI exits 1)."""

    exit_code = 1


class NotShipped(FtdeployError):
    """A compressed variant was refused and the stage was asked to fail for it (``--strict``)."""


class RequestError(FtdeployError):
    """An answer other than 200 to a serving request: a status, a code and a message (HTTP-free, so
    that a task's codec raises it without knowing the server)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


class BadInput(RequestError):
    """Something wrong with the request itself (4xx): a corrupt image, an empty text, bad JSON."""
