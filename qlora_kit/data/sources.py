"""The data sources of a run (``data.datasets``, or the one ``data.path``): each read, parsed and split on its
own; validation rows taken from every source in proportion; training samples mixed by weight.

Everything here is a pure function of the config, the files and ``train.seed``: the mixed sample list is the
same on every run, so the batch plan (a function of seed and epoch over that list) resumes exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

from qlora_kit.core.config import DataConfig
from qlora_kit.core.errors import DataError
from qlora_kit.data.encode import Encoded, Sample
from qlora_kit.data.formats import CHAT_FORMATS, Parsed, Row, parse_rows, resolve_format
from qlora_kit.data.pairs import PREFERENCE, parse_pairs
from qlora_kit.data.read import read_source

log = logging.getLogger("qlora_kit")

TEMPLATE_FIX = ("set model.chat_template: chatml, llama3 or mistral (templates qlora-kit ships) or a Jinja "
                "template, or use a chat/instruct model")


@dataclass(frozen=True)
class SourceSpec:
    """One data source as configured."""

    key: str  # the config key naming it: data.path or data.datasets[2]
    path: str
    format: str
    split: str
    subset: str | None = None
    weight: float = 1.0
    max_rows: int | None = None
    val_path: str | None = None  # this source's own validation file

    @property
    def path_key(self) -> str:
        return self.key if self.key == "data.path" else f"{self.key}.path"

    @property
    def val_key(self) -> str:
        return "data.val_path" if self.key == "data.path" else f"{self.key}.val_path"


def source_specs(cfg: DataConfig) -> list[SourceSpec]:
    """The sources of ``cfg``: ``data.path`` (with ``data.val_path``), or each entry of ``data.datasets``."""
    if cfg.datasets is None:
        assert cfg.path is not None
        return [SourceSpec("data.path", cfg.path, cfg.format, cfg.split, cfg.subset, 1.0, cfg.max_rows, cfg.val_path)]
    return [SourceSpec(f"data.datasets[{i}]", d.path, d.format or cfg.format, d.split or cfg.split, d.subset,
                       1.0 if d.weight is None else d.weight, d.max_rows, d.val_path)
            for i, d in enumerate(cfg.datasets, 1)]


@dataclass
class SourceData:
    """One source through the pipeline: parsed rows, its split, its encodings and the samples it contributes."""

    spec: SourceSpec
    part: Parsed
    val_part: Parsed | None = None  # its own validation file
    train_rows: list[Row] = field(default_factory=list)
    val_rows: list[Row] = field(default_factory=list)
    train_enc: list[Encoded] = field(default_factory=list)
    val_enc: list[Encoded] = field(default_factory=list)
    mixed: list[Sample] = field(default_factory=list)  # its training samples after weighting


def load_and_parse(path: str, spec: SourceSpec, key: str, has_template: bool, seed: int, announce: bool
                   ) -> Parsed:
    """Read one file or hub split (named by config ``key``), resolve its format and parse its rows.

    Raises:
        DataError: see ``read_source``/``resolve_format``; chat rows without a chat template.
    """
    source = read_source(path, spec.split, key, spec.subset, spec.max_rows, seed)
    fmt, detected = resolve_format(spec.format, source, announce=announce)
    if fmt in CHAT_FORMATS and not has_template:
        raise DataError(f"{source.label} holds {fmt!r} chat rows but the tokenizer has no chat template",
                        TEMPLATE_FIX, key="model.chat_template")
    if fmt in ("alpaca", "prompt_completion", PREFERENCE) and not has_template:
        log.warning("tokenizer has no chat template: %s rows are trained as plain prompt + completion text "
                    "(model.chat_template: chatml, llama3 or mistral makes them conversations)", fmt)
    rows, bad = (parse_pairs if fmt == PREFERENCE else parse_rows)(source, fmt, has_template)
    return Parsed(rows, bad, len(source.records), source, fmt, detected)


def validation_counts(sizes: list[int], fraction: float, cap: int, own_files: list[bool]) -> list[int]:
    """Validation rows per source: round(fraction·n) of each split source (≥ 1 when fraction > 0 and n ≥ 2,
    always leaving one training row), all rows of a source's own validation file; at most ``cap`` in all,
    shared in proportion (largest remainders, ties to the earlier source)."""
    wanted = []
    for n, own in zip(sizes, own_files):
        if own:
            wanted.append(n)
        elif fraction <= 0 or n < 2:
            wanted.append(0)
        else:
            wanted.append(min(max(1, round(n * fraction)), n - 1))
    total = sum(wanted)
    if total <= cap:
        return wanted
    shares = [cap * w / total for w in wanted]
    counts = [math.floor(s) for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (counts[i] - shares[i], i))
    for i in order[: cap - sum(counts)]:
        counts[i] += 1
    return counts


def _rng(seed: int, index: int) -> random.Random:
    """The seeded generator of source ``index`` (the first source's is ``Random(seed)``, as with one source)."""
    return random.Random(seed if index == 0 else f"{seed}:{index}")


def split_sources(sources: list[SourceData], fraction: float, cap: int, seed: int) -> None:
    """Fill each source's train/val rows: its own validation file, else a seeded hold-out of its rows; the number
    of validation rows per source from :func:`validation_counts`."""
    sizes = [len(s.val_part.rows) if s.val_part else len(s.part.rows) for s in sources]
    counts = validation_counts(sizes, fraction, cap, [s.val_part is not None for s in sources])
    for index, (src, n_val) in enumerate(zip(sources, counts)):
        rows = src.part.rows
        if src.val_part is not None:
            src.train_rows, src.val_rows = rows, pick(src.val_part.rows, n_val, _rng(seed, index))
            if n_val < len(src.val_part.rows):
                log.info("using %d of %d validation rows of %s (data.val_max_rows)", n_val, len(src.val_part.rows),
                         src.val_part.source.label)
            continue
        picked = set(_rng(seed, index).sample(range(len(rows)), n_val)) if n_val else set()
        src.train_rows = [r for i, r in enumerate(rows) if i not in picked]
        src.val_rows = [r for i, r in enumerate(rows) if i in picked]


def pick(rows: list[Row], n: int, rng: random.Random) -> list[Row]:
    """A seeded choice of ``n`` rows, in file order (all of them when there are no more)."""
    if len(rows) <= n:
        return rows
    keep = set(rng.sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def weighted(samples: list[Sample], weight: float, seed: int, index: int) -> list[Sample]:
    """The samples of a source as used per epoch: ``floor(weight)`` copies plus a seeded choice of
    ``round(frac(weight) · n)`` more (weight 1: the samples themselves)."""
    copies, fraction = int(weight), weight - int(weight)
    out = samples * copies
    extra = round(fraction * len(samples))
    if extra:
        keep = set(random.Random(f"weight:{seed}:{index}").sample(range(len(samples)), extra))
        out += [s for i, s in enumerate(samples) if i in keep]
    return out


def fingerprint(sources: list[SourceData], shared_val: Parsed | None) -> dict[str, Any]:
    """Identity of the data for the manifest and the resume check: paths, sha256s and formats.

    One source (``data.path``): its path, sha256, validation file and format, as ever. Several: ``sha256`` over
    every source's (and validation file's) sha256 and ``sources`` with each one's, so a resume refuses a
    changed source by content and names it, while a moved file with the same content still resumes.
    """
    val = shared_val if shared_val is not None else (sources[0].val_part if len(sources) == 1 else None)
    if len(sources) == 1 and sources[0].spec.key == "data.path":
        part = sources[0].part
        return {"path": part.source.label, "sha256": part.source.sha256, "val_path": val.source.label if val else None,
                "val_sha256": val.source.sha256 if val else None, "format": part.format}
    entries = [{"key": s.spec.key, "path": s.part.source.label, "sha256": s.part.source.sha256,
                "val_path": s.val_part.source.label if s.val_part else None,
                "val_sha256": s.val_part.source.sha256 if s.val_part else None, "format": s.part.format}
               for s in sources]
    combined = "\n".join(f"{e['sha256']}|{e['val_sha256']}" for e in entries)
    return {"path": None, "sha256": hashlib.sha256(combined.encode()).hexdigest(),
            "val_path": shared_val.source.label if shared_val else None,
            "val_sha256": shared_val.source.sha256 if shared_val else None,
            "format": "+".join(dict.fromkeys(e["format"] for e in entries)), "sources": entries}
