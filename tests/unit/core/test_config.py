"""Config schema: every problem listed at once, overrides validated like the file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from qlora_kit.core.config import dump_config, load_config, parse_override, validate
from qlora_kit.core.errors import ConfigError
from qlora_kit.core.safe_yaml import read_yaml


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


@pytest.mark.parametrize("value, ok", [("2", True), ("1.6", True), ("1", True), ("0.5", False), ("0", False),
                                       (".nan", False), (".inf", False), ("true", False), ("sometimes", False)])
def test_checkpoint_every_n_layers_takes_auto_or_a_number_from_1(tmp_path: Path, value: str, ok: bool) -> None:
    overrides = [f"train.checkpoint_every_n_layers={value}"]
    if ok:
        cfg, _ = load_config(_write(tmp_path, MINIMAL), overrides)
        assert cfg.train.checkpoint_every_n_layers == float(value)
    else:
        with pytest.raises(ConfigError, match="checkpoint_every_n_layers"):
            load_config(_write(tmp_path, MINIMAL), overrides)


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


BOMB = "".join(f"{n}: &{n} [" + ", ".join([f"*{p}"] * 9 if p else ["x"] * 9) + "]\n"
               for p, n in zip([None, *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("text, message", [
    (BOMB + "train: {max_steps: *i}\n", "expands to more than 20,000 values"),
    ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nests deeper than 32 levels"),
    ("a: &a [1, 2]\n" + "".join(f"l{i}: &l{i} [*{'a' if i == 0 else f'l{i - 1}'}]\n" for i in range(40)),
     "nests deeper than 32 levels once its aliases are expanded"),
    ("x: &r [*r]\n", "recursive YAML alias"),
    ("x: '" + "y" * (1024**2 + 10) + "'\n", "larger than 1024 KiB"),
])
def test_unbounded_yaml_is_refused_at_once(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as err:
        read_yaml(path)
    assert time.perf_counter() - start < 0.5
    assert len(str(err.value)) < 400


def test_small_yaml_aliases_still_work(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("common: &c [q_proj, v_proj]\nmodel: {name_or_path: m}\ndata: {path: d}\noutput_dir: o\n"
                    "lora: {target_modules: *c}\n")
    raw = read_yaml(path)
    raw.pop("common")
    assert validate(raw).lora.target_modules == ["q_proj", "v_proj"]


def test_error_messages_never_echo_unbounded_input() -> None:
    raw = {"model": {"name_or_path": "m"}, "data": {"path": "d"}, "output_dir": "o",
           "lora": {"target_modules": "z" * 1_000_000}, "train": {"seed": 10**30, "max_steps": [[1] * 1000] * 1000},
           "k" * 100_000: 1}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert len(str(err.value)) < 2000, str(err.value)[:3000]


def test_override_problems_name_the_set_argument_and_the_section(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["max_steps=30"])
    assert err.value.message == "--set max_steps=30: unknown key 'max_steps' (did you mean 'train.max_steps'?)"
    assert err.value.hint == "--set train.max_steps=30"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.max_steps=3"])
    assert "did you mean 'train.max_steps'?" in err.value.message
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.max_steps=soon"])
    assert err.value.message.startswith("--set train.max_steps=soon: train.max_steps:")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["lora.r=-1", "max_steps=3"])
    assert err.value.message.startswith("--set: 2 problems") and "--set lora.r=-1: lora.r" in err.value.message


def test_file_problems_name_the_file_and_suggest_the_section(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "max_steps: 30\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.max_steps=5"])
    assert err.value.message == f"{path}: unknown key 'max_steps' (did you mean 'train.max_steps'?)"
    assert str(path) in (err.value.hint or "")


@pytest.mark.parametrize("in_file, override, said", [
    (True, None, "it is set in {path} (edit it there"),
    (True, "data.val_path=elsewhere.jsonl", "it was given with --set data.val_path"),
    (False, None, "it is the default"),
])
def test_errors_about_a_value_say_where_it_was_set(tmp_path: Path, in_file: bool, override: str | None,
                                                    said: str) -> None:
    from qlora_kit.core.config import attribute_origin
    from qlora_kit.core.errors import DataError

    text = MINIMAL.replace("data: {path: data.jsonl}", "data: {path: data.jsonl, val_path: old.jsonl}")
    path = _write(tmp_path, text if in_file else MINIMAL)
    _, sources = load_config(path, [override] if override else [])
    exc = DataError("data file old.jsonl does not exist", "check data.val_path", key="data.val_path")
    attribute_origin(exc, sources)
    assert exc.hint.startswith("check data.val_path; " + said.format(path=path))
