"""README "Python API": its example runs as printed (on the tiny model instead of SmolLM2, for speed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT, arithmetic_rows, write_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]

CONFIG = "configs/smollm2-135m_qlora_cpu.yaml"


def readme_api_example() -> str:
    """The ```python block of README's "Python API" section."""
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has one example"
    return blocks[0]


def test_the_readme_example_runs_as_printed(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_api_example()
    assert f'qlora_kit.train("{CONFIG}"' in code
    # The files it names, where it names them; the shipped CPU config with the tiny model as its model.
    shipped = (ROOT / CONFIG).read_text()
    assert "name_or_path: smollm2-demo" in shipped
    (tmp_path / "configs").mkdir()
    (tmp_path / CONFIG).write_text(shipped.replace("name_or_path: smollm2-demo", f"name_or_path: {tiny_llama}"))
    data = re.search(r'"data.path": "([^"]+)"', code).group(1)
    write_jsonl(tmp_path / data, arithmetic_rows(64))
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)

    run, merged = namespace["run"], namespace["merged"]
    steps = int(re.search(r'"train.max_steps": (\d+)', code).group(1))
    assert run.status == "completed" and run.metrics["step"] == steps
    assert run.run_dir == tmp_path / "out" / "my-run" and (run.run_dir / "adapter" / "adapter_config.json").is_file()
    assert merged.verification["status"] == "passed" and (merged.out / "config.json").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{run.run_dir} {{'step': {steps}, 'train_loss': ")
    assert len(printed) >= 2  # the reply (the tiny model's is random text, maybe empty)
