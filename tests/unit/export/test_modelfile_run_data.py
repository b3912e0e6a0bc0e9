"""The Modelfile follows what the run trained: data.default_system_prompt, and a note for tool calls (issue 21)."""

from __future__ import annotations

from qlora_kit.export.modelfile import TOOLS_NOTE, ChatFormat, note_tools, use_run_system, write_modelfile


def chatml(system: str | None = "You are a helpful assistant.") -> ChatFormat:
    return ChatFormat("chatml", "{{ .Prompt }}", system=system, stops=["<|im_end|>"])


def test_system_follows_the_policy() -> None:
    assert use_run_system(chatml(), "keep").system == "You are a helpful assistant."
    text = write_modelfile(use_run_system(chatml(), "Answer in French."), "m.gguf", "m")
    assert 'SYSTEM """Answer in French."""' in text
    dropped = use_run_system(chatml(), "drop")
    assert dropped.system is None and "empty system turn" in dropped.warning
    assert use_run_system(chatml(None), "drop").warning is None  # no default: nothing differs


def test_tool_runs_get_a_note_in_the_modelfile() -> None:
    assert note_tools(chatml(), False).warning is None
    fmt = note_tools(use_run_system(chatml(), "drop"), True)
    text = write_modelfile(fmt, "m.gguf", "m")
    warnings = [line for line in text.splitlines() if line.startswith("# warning: ")]
    assert len(warnings) == 1 and "empty system turn" in warnings[0] and warnings[0].endswith(TOOLS_NOTE)
    assert text.index("# warning") < text.index("FROM ./m.gguf")
