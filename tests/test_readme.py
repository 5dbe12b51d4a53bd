"""The README stays true: its Python block runs, and CI calls its test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_api_block_runs():
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - executing our own README
    assert scope["result"].summary["rounds"] == 8
    assert all(p.grad is not None for p in scope["model"].parameters())


def test_ci_runs_the_readme_test_command():
    assert "make test" in README and "make demo" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
