"""A small interpreter of Go's text/template, enough to render Ollama chat templates in tests.

No Go toolchain or Ollama is available here, so the Modelfile's TEMPLATE is checked by
rendering it with this interpreter and comparing with the run's Jinja template.  It follows
text/template's semantics for the subset Ollama templates use: text, ``{{ pipeline }}``,
``if / else if / else / end``, ``range`` (with ``$i, $m :=``), variables (``:=`` declares in
the current scope, ``=`` assigns the nearest), ``$`` (the root), field access, string / int /
bool literals, parentheses, the functions ``eq ne and or not len slice``, Go truthiness, and
the ``{{-`` / ``-}}`` whitespace trimming.  Anything else raises, so a template that uses more
than this is noticed rather than misrendered.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|\$?[\w.]*[\w]|\$|\.)')


def render(template: str, data: dict[str, Any]) -> str:
    """Render ``template`` with ``data`` as dot."""
    nodes, rest = _parse(_lex(template), stop=())
    assert not rest, f"unexpected {rest[0]}"
    out: list[str] = []
    _run(nodes, data, data, [{}], out)
    return "".join(out)


# --------------------------------------------------------------------------- lexing and parsing


def _lex(template: str) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            pos += len(template[pos:]) - len(template[pos:].lstrip())
    items.append(("text", template[pos:]))
    return [i for i in items if i != ("text", "")]


def _parse(items: list[tuple[str, str]], stop: tuple[str, ...]) -> tuple[list[Any], list[tuple[str, str]]]:
    nodes: list[Any] = []
    while items:
        kind, value = items[0]
        if kind == "text":
            nodes.append(("text", value))
            items = items[1:]
            continue
        word = value.split(" ", 1)[0]
        if word in stop or value.startswith("else"):
            return nodes, items
        items = items[1:]
        if word == "if":
            node, items = _parse_if(value[3:], items)
            nodes.append(node)
        elif word == "range":
            node, items = _parse_range(value[6:], items)
            nodes.append(node)
        else:
            nodes.append(("action", _tokens(value)))
    return nodes, items


def _parse_if(cond: str, items: list[tuple[str, str]]) -> tuple[Any, list[tuple[str, str]]]:
    branches = []
    body, items = _parse(items, stop=("end",))
    branches.append((_tokens(cond), body))
    while items and items[0][1].startswith("else"):
        head = items[0][1]
        items = items[1:]
        body, items = _parse(items, stop=("end",))
        branches.append((_tokens(head[8:]) if head.startswith("else if") else None, body))
    assert items and items[0][1] == "end", "if without end"
    return ("if", branches), items[1:]


def _parse_range(head: str, items: list[tuple[str, str]]) -> tuple[Any, list[tuple[str, str]]]:
    names: list[str] = []
    m = re.match(r"\s*(\$\w+)\s*(?:,\s*(\$\w+)\s*)?:=\s*(.*)", head)
    if m:
        names = [n for n in (m.group(1), m.group(2)) if n]
        head = m.group(3)
    body, items = _parse(items, stop=("end",))
    assert items and items[0][1] == "end", "range without end"
    return ("range", names, _tokens(head), body), items[1:]


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        assert m and m.end() > pos, f"cannot parse {text[pos:]!r}"
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


# --------------------------------------------------------------------------- evaluation


def _run(nodes: list[Any], dot: Any, root: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            toks = node[1]
            if len(toks) >= 2 and toks[1] in (":=", "="):
                value = _eval(toks[2:], dot, root, scopes)
                if toks[1] == ":=":
                    scopes[-1][toks[0]] = value
                else:
                    next(s for s in reversed(scopes) if toks[0] in s)[toks[0]] = value
            else:
                out.append(_print(_eval(toks, dot, root, scopes)))
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truthy(_eval(cond, dot, root, scopes)):
                    scopes.append({})
                    _run(body, dot, root, scopes, out)
                    scopes.pop()
                    break
        elif kind == "range":
            _, names, expr, body = node
            for i, item in enumerate(_eval(expr, dot, root, scopes) or []):
                scope = dict(zip(names, [i, item] if len(names) == 2 else [item]))
                scopes.append(scope)
                _run(body, item, root, scopes, out)
                scopes.pop()


def _eval(tokens: list[str], dot: Any, root: Any, scopes: list[dict[str, Any]]) -> Any:
    args, rest = _operands(tokens, dot, root, scopes)
    assert not rest, f"unexpected {rest}"
    head = args[0]
    if callable(head):
        return head(*args[1:])
    assert len(args) == 1, f"not a function: {tokens}"
    return head


def _operands(tokens: list[str], dot: Any, root: Any, scopes: list[dict[str, Any]]) -> tuple[list[Any], list[str]]:
    args: list[Any] = []
    while tokens and tokens[0] != ")":
        tok, tokens = tokens[0], tokens[1:]
        if tok == "(":
            depth, j = 1, 0
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            args.append(_eval(tokens[: j - 1], dot, root, scopes))
            tokens = tokens[j:]
        else:
            args.append(_operand(tok, dot, root, scopes))
    return args, tokens


def _operand(tok: str, dot: Any, root: Any, scopes: list[dict[str, Any]]) -> Any:
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    if tok.isdigit():
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if tok in _FUNCS:
        return _FUNCS[tok]
    if tok == ".":
        return dot
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        base = root if name == "$" else next(s[name] for s in reversed(scopes) if name in s)
        return _fields(base, path)
    assert tok.startswith("."), f"unknown operand {tok!r}"
    return _fields(dot, tok[1:])


def _fields(value: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        value = value[name]
    return value


def _truthy(value: Any) -> bool:
    return bool(value)


def _print(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _and(*args: Any) -> Any:
    for a in args:
        if not _truthy(a):
            return a
    return args[-1]


def _or(*args: Any) -> Any:
    for a in args:
        if _truthy(a):
            return a
    return args[-1]


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "and": _and, "or": _or,
    "not": lambda a: not _truthy(a), "len": len, "slice": lambda a, *i: a[i[0]:i[1]] if len(i) > 1 else a[i[0]:],
}
