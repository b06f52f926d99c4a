"""Every Python example in the README and the docs runs, so the examples cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "legacy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [
    (page, index, block)
    for page in PAGES
    for index, block in enumerate(
        re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    )
]


def test_pages_have_examples() -> None:
    assert len(EXAMPLES) >= 15


@pytest.mark.parametrize(
    ("page", "index", "block"),
    EXAMPLES,
    ids=[f"{page.relative_to(ROOT)}[{index}]" for page, index, _ in EXAMPLES],
)
def test_example_runs(page: Path, index: int, block: str) -> None:
    code = compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec")
    exec(code, {"__name__": f"example_{index}"})
