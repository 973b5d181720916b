"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def test_ci_runs_the_readme_test_command():
    text = README.read_text()
    marker = text.index("<!-- test-command -->")
    command = re.search(r"```bash\n(.*?)\n```", text[marker:], flags=re.S).group(1).strip()
    assert "pytest" in command
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci  # .ci/run extracts and runs that very line
