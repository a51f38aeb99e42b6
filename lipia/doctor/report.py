"""What ``lipia doctor`` prints: a Rich table (pass or fail per check, with the fix), the same as
JSON, and the checklist's section 10 "What to share" bundle in Markdown.

Everything leaving here is masked: phone numbers (bare, or inside CheckoutRequestIDs) and any
secret given (consumer key and secret, passkey, tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lipia import __version__
from lipia.doctor.findings import Findings, Outcome
from lipia.redact import mask_checkout_id, scrub_personal_data

_STYLE = {Outcome.PASS: "green", Outcome.WARN: "yellow", Outcome.FAIL: "bold red", Outcome.SKIP: "dim"}
_MARK = {Outcome.PASS: "✔ pass", Outcome.WARN: "! warn", Outcome.FAIL: "✘ fail", Outcome.SKIP: "- skip"}


class Masker:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, "[redacted]")
        return scrub_personal_data(value)

    def data(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self.data(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.data(item) for item in value]
        if isinstance(value, str):
            return self.text(value)
        return value


def table(findings: Findings, masker: Masker) -> Table:
    result = Table(title=f"lipia doctor {masker.text(findings.url)}", title_justify="left", show_lines=True)
    result.add_column("check")
    result.add_column("result")
    result.add_column("what was seen, and the fix", overflow="fold")
    for check in findings.checks:
        text = masker.text(check.detail)
        if check.fix:
            text += f"\n[bold]fix:[/bold] {masker.text(check.fix)}"
        result.add_row(check.name, f"[{_STYLE[check.outcome]}]{_MARK[check.outcome]}[/]", text)
    return result


def print_report(findings: Findings, masker: Masker, console: Console | None = None) -> None:
    console = console or Console()
    console.print(table(findings, masker))
    failed = sum(c.outcome is Outcome.FAIL for c in findings.checks)
    if failed:
        console.print(f"[bold red]{failed} check(s) failed.[/]")
    else:
        console.print("[green]Every check passed.[/]")


def as_json(findings: Findings, masker: Masker) -> dict[str, Any]:
    body: dict[str, Any] = masker.data(
        {
            "url": findings.url,
            "ok": not findings.failed,
            "checks": [check.to_json() for check in findings.checks],
            "checkout_request_id": mask_checkout_id(findings.checkout_request_id),
            "decided_by": findings.decided_by,
            "timings": findings.timings,
            "polls": findings.polls,
            "initiate": findings.initiate_body,
            "status": findings.last_status,
        }
    )
    return body


def markdown(findings: Findings, masker: Masker) -> str:
    """The checklist's section 10, filled in: what the status returns, the callback log lines,
    whether a callback was seen, the CheckoutRequestID, the timings, and every check."""
    lines = [
        "# What to share: lipia doctor report",
        "",
        f"Backend: `{masker.text(findings.url)}`, checked by lipia doctor {__version__}. Phone numbers "
        "and secrets are masked.",
        "",
        "## Checks",
        "",
        "| check | result | what was seen | fix |",
        "| --- | --- | --- | --- |",
    ]
    for check in findings.checks:
        cells = [check.name, check.outcome.value, masker.text(check.detail), masker.text(check.fix or "")]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    lines += [
        "",
        "## 1. What `/api/payments/status/{id}` returns",
        "",
        "```json",
        json.dumps(masker.data(findings.last_status), indent=2, ensure_ascii=False),
        "```",
    ]
    if len(findings.status_bodies) > 1:
        lines += [
            "",
            f"It answered {len(findings.status_bodies)} different bodies; the first:",
            "",
            "```json",
        ]
        lines += [json.dumps(masker.data(findings.status_bodies[0]), indent=2, ensure_ascii=False), "```"]
    evidence = [masker.text(line) for line in findings.callback_evidence]
    received = [line for line in evidence if "CALLBACK RECEIVED" in line.upper() or '"path"' in line]
    lines += ["", "## 2. The backend's log lines for this payment's callback", ""]
    if evidence:
        lines += ["```", *evidence, "```"]
    else:
        lines.append(
            "Not collected: pass `--log FILE` (lipia's log), or `--config` for lipia's own timeline."
        )
    lines += [
        "",
        '## 3. Was "M-PESA CALLBACK RECEIVED" seen after paying?',
        "",
        ("Yes." if received else "No." if evidence else "Unknown (no log lines collected).")
        + (f" ({len(received)} line(s))" if received else ""),
        "",
        "## 4. The CheckoutRequestID",
        "",
        f"`{mask_checkout_id(findings.checkout_request_id) or 'none: initiate returned none'}` "
        "(the payer's digits masked)",
        "",
        "## Timings",
        "",
    ]
    lines += [f"- {name.replace('_', ' ')}: {value}" for name, value in findings.timings.items()]
    lines += [f"- status polls: {findings.polls}", ""]
    return "\n".join(lines)


def log_lines_for(path: Path, ids: Iterable[str | None], *, limit: int = 200) -> list[str]:
    """The lines of a log file that mention the payment (its ids, full or masked)."""
    needles = [i for i in ids if i]
    needles += [mask_checkout_id(i) for i in needles]
    found: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as log:
        for line in log:
            if any(needle in line for needle in needles):
                found.append(line.rstrip("\n"))
                if len(found) >= limit:
                    break
    return found
