"""What ``lipia doctor`` found: one ``Check`` per item of the checklist, each passed, warned,
failed or skipped, with what was seen and, when it is not a pass, the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "outcome": self.outcome.value, "detail": self.detail, "fix": self.fix}


@dataclass
class Findings:
    url: str
    checks: list[Check] = field(default_factory=list)
    # The payment doctor made: the initiate's answer, every distinct status answer, timings.
    checkout_request_id: str | None = None
    initiate_body: Any = None
    status_bodies: list[Any] = field(default_factory=list)
    decided_by: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    # Callback evidence for the "what to share" bundle (log lines, or the admin timeline's).
    callback_evidence: list[str] = field(default_factory=list)

    def add(self, name: str, outcome: Outcome, detail: str, fix: str | None = None) -> Check:
        check = Check(name, outcome, detail, fix)
        self.checks.append(check)
        return check

    @property
    def failed(self) -> bool:
        return any(check.outcome is Outcome.FAIL for check in self.checks)

    @property
    def last_status(self) -> Any:
        return self.status_bodies[-1] if self.status_bodies else None
