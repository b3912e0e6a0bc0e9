"""Config schema: every problem listed at once, overrides validated like the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora_kit.config import dump_config, load_config, parse_override, validate
from qlora_kit.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


MINIMAL = """
model: {name_or_path: some/model}
data: {path: data.jsonl}
output_dir: out
"""


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg, sources = load_config(_write(tmp_path, MINIMAL))
    assert cfg.lora.target_modules == "attention"
    assert cfg.train.optimizer == "auto"
    assert cfg.data.packing is True and cfg.train.fused_loss is True and cfg.lora.adapter_dtype == "float32"
    assert cfg.train.activation_offload == cfg.train.tiled_mlp == cfg.train.checkpoint_every_n_layers == "auto"
    assert cfg.model.trust_remote_code is False
    assert sources["lora.r"] == "default"
    assert sources["model.name_or_path"].startswith("file ")


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = """
model: {name_or_path: m, chat_templat: x}
lora: {r: -1, dropout: 2}
data: {path: d.jsonl, format: chatml}
train: {max_steps: abc, learnin_rate: 1}
output_dir: out
extra: 1
"""
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    msg = str(err.value)
    assert "7 problems" in msg
    assert "'model.chat_templat' (did you mean 'chat_template'?)" in msg
    assert "'train.learnin_rate' (did you mean 'learning_rate'?)" in msg
    assert "unknown key 'extra'" in msg
    assert "lora.r: Input should be greater than 0 (got -1)" in msg
    assert "lora.dropout" in msg and "data.format" in msg and "train.max_steps" in msg


def test_missing_required_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "model: {name_or_path: m}\n"))
    assert "data: Field required" in str(err.value)
    assert "output_dir: Field required" in str(err.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "model:\n  name_or_path: m\n  bad: [1, 2\ndata: {}\n"))
    assert "YAML syntax error" in str(err.value) and "line" in str(err.value)


@pytest.mark.parametrize("text, expected", [("", "is empty"), ("- a\n- b\n", "must be a mapping")])
def test_empty_or_non_mapping(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(_write(tmp_path, text))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_yaml_and_validated(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    cfg, sources = load_config(path, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]",
                                      "data.packing=true"])
    assert cfg.train.max_steps == 7 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.packing
    assert sources["train.max_steps"] == "override --set"
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(path, ["train.max_steps=soon"])
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        load_config(path, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.max_steps")


def test_contradictory_settings_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"warmup_steps \(10\) must be smaller than train.max_steps \(5\)"):
        load_config(_write(tmp_path, MINIMAL), ["train.max_steps=5", "train.warmup_steps=10"])


def test_dump_round_trips_with_origins(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    cfg, sources = load_config(_write(tmp_path, MINIMAL), [f"model.chat_template={template!r}"])
    text = dump_config(cfg, sources)
    assert "# default" in text and "# override --set" in text
    assert validate(yaml.safe_load(text)) == cfg
    assert validate(yaml.safe_load(text)).model.chat_template == template
