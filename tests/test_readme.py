"""The README's Python examples run as written, so they cannot drift from the code."""

import re
import tomllib
from pathlib import Path

import pytest

from graphcomp import pipeline

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, monkeypatch):
    # Passes that an example registers leave the registry with the test.
    pipeline.available_passes()
    monkeypatch.setattr(pipeline, "_REGISTRY", dict(pipeline._REGISTRY))
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_readme_entry_point_matches_example_package():
    section = README.read_text().split("## Write a pass", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```toml\n(.*?)```", section, flags=re.DOTALL)
    example = Path(__file__).resolve().parent.parent / "examples" / "custom_pass"
    project = tomllib.loads((example / "pyproject.toml").read_text())["project"]
    assert tomllib.loads(block)["project"]["entry-points"] == project["entry-points"]
