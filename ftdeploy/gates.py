"""Pass/fail gates: every check is collected, the report is written, then one GateError lists them all.

>>> gates = Gates()
>>> gates.check(0.5 <= 1e-4, "fp32 parity: max |logit diff| 0.5 > atol 0.0001")
>>> gates.check(True, "never shown")
>>> gates.passed, gates.failures
(False, ['fp32 parity: max |logit diff| 0.5 > atol 0.0001'])
"""

from __future__ import annotations

from .errors import GateError


class Gates:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures)}

    def raise_if_failed(self, report_path: str | None = None) -> None:
        if self.failures:
            raise GateError(self.failures, report_path)
