"""Headless Chromium for the viewer's tests: Debian's package, installed with apt-get when missing (as root, as
the Slurm tests install slurm-wlm); without it and without a way to install it, the test is skipped, naming why."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

INSTALL = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium"
NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """The browser's executable, installed first where it is missing and this is a root shell with apt-get."""
    found = next((path for name in NAMES if (path := shutil.which(name))), None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and no apt-get as root to install it (apt-get install chromium)")
    try:
        result = subprocess.run(["bash", "-c", INSTALL], capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get install chromium timed out")
    if result.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"apt-get install chromium failed: {(result.stderr or result.stdout)[-400:]}")
    return str(shutil.which("chromium"))


def _headless(page: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", *flags, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)


def rendered_dom(page: Path) -> str:
    """The page's DOM once its scripts ran (offline: a file URL)."""
    return _headless(page, "--virtual-time-budget=30000", "--dump-dom").stdout


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 1000) -> Path:
    """A PNG of the page's first ``width`` x ``height`` pixels."""
    _headless(page, f"--screenshot={out}", f"--window-size={width},{height}", "--hide-scrollbars")
    return out


class Tokens(HTMLParser):
    """The token elements of a rendered page: ``(text, title)`` in document order, and the panel headings."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[tuple[str, str]] = []
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "span" and "tok" in (attributes.get("class") or "").split():
            self.tokens.append(("", attributes.get("title") or ""))
            self._in = "tok"
        elif tag == "h2":
            self.headings.append("")
            self._in = "h2"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "h2"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "tok":
            text, title = self.tokens[-1]
            self.tokens[-1] = (text + data, title)
        elif self._in == "h2":
            self.headings[-1] += data
