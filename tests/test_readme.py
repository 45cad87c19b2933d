"""Every ```python block of README.md (and of docs/*.md) runs as written, so the front door
never shows code that fails (the quick start once raised IndexError on
``gru.last_solve_info[0].method``). Blocks of one page run in order in one namespace, as a
reader pasting them into one session would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


def test_extractor_finds_the_quick_start():
    # the extractor must see blocks, or the test below could pass on nothing
    blocks = _blocks(ROOT / "README.md")
    assert blocks and any("paraseq.linear_scan" in b for b in blocks)


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_runs(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(_blocks(page)):
        code = compile(block, f"{page.name}[block {i}]", "exec")
        exec(code, namespace)  # the page's own example code
