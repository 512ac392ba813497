"""The README's examples marked `# demo/<file>` are the demo's code, line for line."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```python\n# (demo/[\w/]+\.py)\n(.*?)```", re.S)


def test_readme_examples_are_the_demo_code() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = BLOCK.findall(readme)
    assert len(blocks) >= 3, "the README should show the demo's service and consumer"
    for path, body in blocks:
        source = (REPO / path).read_text()
        assert body in source, f"README block from {path} differs from the file:\n{body}"
