"""The README's embedded example runs as written (so the README stays true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_embedded_example_runs():
    section = README.read_text().split("## Embedded in ten lines", 1)
    assert len(section) == 2, "README has no embedded example section"
    block = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert block, "the embedded example section has no python block"
    exec(compile(block.group(1), "README.md", "exec"), {})  # noqa: S102 - our own README
