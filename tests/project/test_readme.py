"""README's two set-up commands are the ones CI runs and the ones the project supports."""

from __future__ import annotations

import re

from conftest import ROOT


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    install_demo, tests = blocks[0], blocks[1]
    assert install_demo.endswith("qlora-kit demo") and "pip install" in install_demo
    assert tests.endswith("pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "CI must run README command 2 verbatim"


def test_readme_names_existing_configs() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in re.findall(r"([\w.\-]+_qlora_(?:24gb|cpu)\.yaml)", readme):
        assert (ROOT / "configs" / name).is_file(), name


def test_readme_has_a_parsing_example_row_for_every_format() -> None:
    import json

    from qlora_kit.data.formats import FORMAT_FIELDS, detect_format, parse_row

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    examples = dict(re.findall(r"^\| `(\w+)` \| `(\{.*\})` \|$", section, flags=re.M))
    assert set(examples) == set(FORMAT_FIELDS)
    for fmt, text in examples.items():
        row = json.loads(text)
        assert detect_format([(1, row)]) == fmt
        if fmt == "preference":  # a pair: its own parser (data/preference.py)
            from qlora_kit.data.pairs import parse_pair

            parse_pair(1, row, chat_template=True)
            continue
        parse_row(1, row, fmt, chat_template=True)  # raises RowProblem for a bad row
