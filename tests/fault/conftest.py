"""The fault-injection suite's ledger: each test records the faults it injects, whether the system survived each
(a clear error or a counted skip, no hang, no crash of the run) and any data lost; the totals are printed in one
line at the end of the session: ``faults injected N, survived N, data lost 0``."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class FaultLedger:
    """Faults by name: injected, survived, data lost."""

    injected: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def inject(self, name: str) -> str:
        self.injected.append(name)
        return name

    def survive(self, name: str) -> None:
        self.survived.append(name)

    def lose(self, name: str) -> None:
        self.lost.append(name)


LEDGER = FaultLedger()


@pytest.fixture
def faults() -> FaultLedger:
    return LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER.injected:
        return
    missing = sorted(set(LEDGER.injected) - set(LEDGER.survived))
    line = (
        f"fault suite: faults injected {len(LEDGER.injected)}, survived {len(LEDGER.survived)}, "
        f"data lost {len(LEDGER.lost)}"
    )
    terminalreporter.write_line(line + (f" (not survived: {', '.join(missing)})" if missing else ""))
