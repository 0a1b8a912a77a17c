"""docs/library.md: every ```python example runs, against a real server, so
the documentation cannot drift from the library."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support import REPO_ROOT

DOC = REPO_ROOT / "docs" / "library.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("number", range(len(EXAMPLES)))
def test_example_runs(server, number):
    program = f"ADDRESS = '127.0.0.1:{server.port}'\n{EXAMPLES[number]}"
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"example {number + 1}:\n{EXAMPLES[number]}\n{result.stderr}"
