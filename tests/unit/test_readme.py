"""The README's two commands are the ones CI runs, character for character."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_readme_commands_are_run_verbatim_by_ci() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    install_and_generate, tests = blocks[0], blocks[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_generate in ci
    assert tests in ci
    assert "zimage generate" in install_and_generate and "pytest" in tests
