"""The Ollama ``Modelfile``: the run's conversation format as a Go template, and its stop tokens.

Ollama does not run the Jinja chat template stored in the GGUF; it needs a Go template, and a
fine-tune whose Modelfile has no template or stop tokens never stops (ollama #8363).  The
conversation format is recognised by *rendering* the run's chat template on a few probe
conversations (with and without a system prompt, one and two user turns) and comparing the
text with each known family's rendering (``FAMILIES``: ChatML, Llama-3, Mistral, Llama-2, with
the pieces that vary between releases read from the probes: default system prompt, system
preamble, spacing).  A family is chosen only when it reproduces every probe the template
accepts exactly; its Go template renders the same text from Ollama's ``.System`` and
``.Messages``.  The leading BOS is left to llama.cpp when the GGUF says ``add_bos_token``.

A template that matches no family gets a plain ``role: content`` template and a warning (the
GGUF still carries the exact template for llama.cpp and LM Studio).  Every end-of-turn token
(the same EOS set as the HF export's ``generation_config.json``) becomes ``PARAMETER stop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Message = dict[str, str]
_S, _U1, _A1, _U2 = "Be brief.", "Hi there!", "Hello! How can I help?", "What is 2 + 2?"
PROBES: list[list[Message]] = [
    [{"role": "user", "content": _U1}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _U1}],
    [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
     {"role": "user", "content": _U2}],
]
_IM_S, _IM_E = "<|im_start|>", "<|im_end|>"
_H_S, _H_E, _EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


@dataclass
class ChatFormat:
    """What the Modelfile says about the conversation format."""

    family: str  # chatml | llama3 | mistral | llama2 | plain
    template: str  # Go template for Ollama
    system: str | None = None  # the template's default system prompt (Modelfile SYSTEM)
    stops: list[str] = field(default_factory=list)
    warning: str | None = None
    render: Callable[[list[Message]], str] | None = None  # the family's rendering (without a leading BOS)


# --------------------------------------------------------------------------- families


def _system_of(messages: list[Message], default: str | None) -> str | None:
    found = [m["content"] for m in messages if m["role"] == "system"]
    return found[0] if found else default


def _chatml(probes: dict[int, str]) -> ChatFormat | None:
    first = probes.get(0, "")
    default = None
    head = f"{_IM_S}system\n"
    if first.startswith(head) and _IM_E in first:
        default = first[len(head):first.index(_IM_E)]

    def render(messages: list[Message]) -> str:
        system = _system_of(messages, default)
        out = f"{head}{system}{_IM_E}\n" if system else ""
        for m in messages:
            if m["role"] != "system":
                out += f"{_IM_S}{m['role']}\n{m['content']}{_IM_E}\n"
        return out + f"{_IM_S}assistant\n"

    go = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
          '{{ end }}{{ end }}<|im_start|>assistant\n')
    return ChatFormat("chatml", go, default, render=render)


def _llama3(probes: dict[int, str]) -> ChatFormat | None:
    def header(role: str) -> str:
        return f"{_H_S}{role}{_H_E}\n\n"

    first, with_system = probes.get(0, ""), probes.get(1)
    block = first[len(header("system")):first.index(_EOT)] if first.startswith(header("system")) else ""
    preamble = ""
    if with_system is not None and with_system.startswith(header("system")):
        own = with_system[len(header("system")):with_system.index(_EOT)]
        preamble = own[: -len(_S)] if own.endswith(_S) else ""
    default = block[len(preamble):] if block.startswith(preamble) else ""

    def render(messages: list[Message]) -> str:
        system = _system_of(messages, default) or ""
        out = f"{header('system')}{preamble}{system}{_EOT}" if (system or preamble) else ""
        for m in messages:
            if m["role"] != "system":
                out += f"{header(m['role'])}{m['content']}{_EOT}"
        return out + header("assistant")

    system_block = "<|start_header_id|>system<|end_header_id|>\n\n" + preamble + "{{ .System }}<|eot_id|>"
    go = (system_block if preamble else "{{ if .System }}" + system_block + "{{ end }}")
    go += ('{{ range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
           '{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
    return ChatFormat("llama3", go, default or None, render=render)


def _inst_pieces(probes: dict[int, str]) -> tuple[str, str, str, str] | None:
    """(user prefix, user suffix, assistant prefix, assistant suffix) of an [INST] template, from probe 2."""
    text = probes.get(2)
    if text is None or _U1 not in text or _A1 not in text or not text.rstrip().endswith("]"):
        return None
    u_pre = text[:text.index(_U1)]
    u_suf = text[text.rindex(_U2) + len(_U2):]
    between = text[text.index(_U1) + len(_U1):text.index(_A1)]
    if not between.startswith(u_suf):
        return None
    if not u_pre or u_pre + _U2 not in text:
        return None
    a_pre = between[len(u_suf):]
    a_suf = text[text.index(_A1) + len(_A1):text.rindex(u_pre + _U2)]
    return u_pre, u_suf, a_pre, a_suf


def _mistral(probes: dict[int, str], system_last: bool) -> ChatFormat | None:
    pieces = _inst_pieces(probes)
    if pieces is None or "<<SYS>>" in probes.get(1, ""):
        return None
    u_pre, u_suf, a_pre, a_suf = pieces
    sep = "\n\n"
    with_system = probes.get(1)
    if with_system is not None and _S in with_system and _U1 in with_system:
        sep = with_system[with_system.index(_S) + len(_S):with_system.index(_U1)]

    def render(messages: list[Message]) -> str:
        system = _system_of(messages, None)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        target = (users[-1] if system_last else users[0]) if users else -1
        out = ""
        for i, m in enumerate(messages):
            if m["role"] == "user":
                out += u_pre + (system + sep if system and i == target else "") + m["content"] + u_suf
            elif m["role"] == "assistant":
                out += a_pre + m["content"] + a_suf
        return out

    user_turn = ('{{ if eq $m.Role "user" }}' + u_pre + "{{ if and $.System " +
                 ("(eq (len (slice $.Messages $i)) 1)" if system_last else "$first") + " }}{{ $.System }}" + sep +
                 "{{ end }}" + ("" if system_last else "{{ $first = false }}") + "{{ $m.Content }}" + u_suf)
    go = ("" if system_last else "{{ $first := true }}") + "{{ range $i, $m := .Messages }}" + user_turn + \
        '{{ else if eq $m.Role "assistant" }}' + a_pre + "{{ $m.Content }}" + a_suf + "{{ end }}{{ end }}"
    return ChatFormat("mistral", go, render=render)


def _llama2(probes: dict[int, str]) -> ChatFormat | None:
    sys_open, sys_close = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def render(messages: list[Message]) -> str:
        system = _system_of(messages, None)
        out, first = "", True
        for m in messages:
            if m["role"] == "user":
                out += ("" if first else "<s>") + "[INST] " + (sys_open + system + sys_close if first and system
                                                                else "") + m["content"] + " [/INST]"
                first = False
            elif m["role"] == "assistant":
                out += f" {m['content']} </s>"
        return out

    go = ('{{ $first := true }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}'
          "{{ if not $first }}<s>{{ end }}[INST] {{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n"
          '{{ end }}{{ $first = false }}{{ $m.Content }} [/INST]{{ else if eq $m.Role "assistant" }} '
          "{{ $m.Content }} </s>{{ end }}{{ end }}")
    return ChatFormat("llama2", go, render=render)


FAMILIES: list[Callable[[dict[int, str]], ChatFormat | None]] = [
    _chatml, _llama3, lambda p: _mistral(p, system_last=True), lambda p: _mistral(p, system_last=False), _llama2,
]
PLAIN_TEMPLATE = ('{{ if .System }}{{ .System }}\n\n{{ end }}{{ range .Messages }}{{ if ne .Role "system" }}'
                  "{{ .Role }}: {{ .Content }}\n{{ end }}{{ end }}assistant: ")


# --------------------------------------------------------------------------- recognising the run's format


def render_probes(tokenizer: Any) -> dict[int, str]:
    """The run's chat template rendered on each probe it accepts (index → text, exactly as rendered)."""
    out = {}
    for i, messages in enumerate(PROBES):
        try:
            out[i] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates refuse conversations in many ways (no system role, raise_exception)
            continue
    return out


def probe_readings(probes: dict[int, str], bos: str | None) -> list[tuple[dict[int, str], str]]:
    """Ways to read the probes: (texts, leading BOS text the template writes itself).

    When every probe starts with the BOS text, it is first read as a BOS the template writes
    (Llama-3's ``<|begin_of_text|>``), then as part of the format itself (SmolLM2's BOS *is*
    ``<|im_start|>``, which opens every ChatML turn).
    """
    readings = []
    if bos and probes and all(text.startswith(bos) for text in probes.values()):
        readings.append(({i: text[len(bos):] for i, text in probes.items()}, bos))
    readings.append((probes, ""))
    return readings


def chat_format(tokenizer: Any, stop_ids: list[int], bos_added_by_runtime: bool) -> ChatFormat:
    """Recognise the run's conversation format and build the Modelfile pieces for it.

    ``bos_added_by_runtime``: the GGUF says ``add_bos_token``, so llama.cpp/Ollama prepend the
    BOS token themselves and the Go template must not write it again.
    """
    stops = stop_strings(tokenizer, stop_ids)
    probes = render_probes(tokenizer) if getattr(tokenizer, "chat_template", None) else {}
    for texts, lead in probe_readings(probes, getattr(tokenizer, "bos_token", None)):
        if 0 not in texts:
            continue
        for family in FAMILIES:
            found = family(texts)
            if found is not None and found.render is not None and all(
                    found.render(PROBES[i]) == text for i, text in texts.items()):
                found.template = ("" if bos_added_by_runtime else lead) + found.template
                found.stops = stops
                return found
    why = "the run has no chat template" if not probes else \
        "the run's chat template matches none of ChatML, Llama-3, Mistral, Llama-2"
    return ChatFormat("plain", PLAIN_TEMPLATE, stops=stops,
                      warning=f"{why}: the Modelfile has a plain 'role: content' template; replace its TEMPLATE "
                              "with your model's format for Ollama (llama.cpp and LM Studio use the exact template "
                              "stored in the GGUF)")


def use_run_system(fmt: ChatFormat, policy: str) -> ChatFormat:
    """The Modelfile's SYSTEM as the run trained rows without a system prompt (``data.default_system_prompt``):
    keep: the template's default; a text: that text; drop: none (with a warning when the template had one: the
    run trained an empty system turn, which Ollama's template leaves out)."""
    if policy == "keep":
        return fmt
    if policy != "drop":
        fmt.system = policy
        return fmt
    if fmt.system:
        note = ("the run trained rows without a system prompt with an empty system turn (data.default_system_prompt: "
                "drop); the Modelfile has no SYSTEM, so Ollama leaves the system turn out instead")
        fmt.warning = f"{fmt.warning}; {note}" if fmt.warning else note
    fmt.system = None
    return fmt


TOOLS_NOTE = ("the run trained tool calls, which this Modelfile's TEMPLATE does not render (Ollama writes tool "
              "lists and calls as its own JSON, not as the training text); for tool calling use the chat template "
              "stored in the GGUF (llama.cpp's llama-server --jinja, LM Studio) or the HF export (vLLM, transformers), "
              "which render tools exactly as in training")


def note_tools(fmt: ChatFormat, trained_tools: bool) -> ChatFormat:
    """Add :data:`TOOLS_NOTE` to the warnings of a run that trained on tool calls."""
    if trained_tools:
        fmt.warning = f"{fmt.warning}; {TOOLS_NOTE}" if fmt.warning else TOOLS_NOTE
    return fmt


def stop_strings(tokenizer: Any, stop_ids: list[int]) -> list[str]:
    """The text of each stop token (EOS, end of turn), in order, without duplicates."""
    texts = [tokenizer.convert_ids_to_tokens(int(i)) for i in stop_ids]
    return list(dict.fromkeys(t for t in texts if t))


def write_modelfile(fmt: ChatFormat, gguf_name: str, title: str) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, default SYSTEM, one stop line per stop token."""
    lines = [f"# Ollama Modelfile for {title}, written by qlora-kit (chat format: {fmt.family})",
             f"# ollama create {title} -f Modelfile"]
    lines += [f"# warning: {fmt.warning}"] if fmt.warning else []
    lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{fmt.template}"""']
    if fmt.system:
        lines.append(f'SYSTEM """{fmt.system}"""')
    lines += [f'PARAMETER stop "{_quote(s)}"' for s in fmt.stops]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
