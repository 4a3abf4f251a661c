"""pipelines/settings.py is the one reader of the environment, and its accessors parse at call time."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import settings

REPO = Path(__file__).resolve().parents[1]


def test_accessors_parse_at_call_time(monkeypatch):
    for name in ("TOKENWORKS_PORT", "TOKENWORKS_SHARE", "TOKENWORKS_MEMORY_BUDGET_GB", "SPACES_ZERO_GPU"):
        monkeypatch.delenv(name, raising=False)
    parsed = lambda: (settings.port(), settings.share(), settings.memory_budget_gb(), settings.zero_gpu())  # noqa: E731
    assert parsed() == (7860, False, None, False)
    monkeypatch.setenv("TOKENWORKS_PORT", "8000")
    monkeypatch.setenv("TOKENWORKS_SHARE", "0")
    monkeypatch.setenv("TOKENWORKS_MEMORY_BUDGET_GB", "1.5")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert parsed() == (8000, False, 1.5, True)
    monkeypatch.setenv("TOKENWORKS_MEMORY_BUDGET_GB", "lots")
    with pytest.raises(ValueError):
        settings.memory_budget_gb()


def test_no_other_module_reads_the_environment():
    sources = [REPO / "app.py", REPO / "request_guard.py", *(REPO / "pipelines").rglob("*.py"),
               *(REPO / "components").rglob("*.py")]
    readers = [path.relative_to(REPO).as_posix() for path in sources
               if re.search(r"os\.environ|getenv", path.read_text()) and path.name != "settings.py"]
    assert readers == []
