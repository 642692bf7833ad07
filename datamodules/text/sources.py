"""Where a text domain's documents come from: JSONL, plain text, a folder, a CSV column,
Python's own docs, or a Hugging Face ``datasets`` name (streamed).

A domain entry of ``benchmark_args.domains`` is one of:

- a bare name: ``docs`` (Python's ``pydoc_data.topics``, on any machine) or a file
  ``<data_root>/<name>.jsonl`` (``news``, ``encyclopedia``, ``forum``, ``reviews`` in
  ``../shared/data/text_domains``);
- a path: a ``.jsonl`` file (one JSON object a line), a ``.txt`` file (documents separated
  by blank lines), a ``.csv`` file (one row a document), or a folder (its ``.jsonl``,
  ``.txt`` and ``.csv`` files, recursively, in sorted order);
- a mapping: ``{name, path | hf | sources, form, text_field, label_field, prompt_field,
  answer_field, config, split, max_documents}``; ``sources`` lists entries merged into one
  domain (e.g. ``{name: general, sources: [encyclopedia, docs]}``); ``hf`` is a Hugging
  Face dataset name or local dataset folder, read with ``streaming=True``.

Files are read line by line and decoded strictly as UTF-8 (a bad byte is refused with its
file and byte offset); reading stops at ``max_documents``, so a large corpus is never held
whole.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme.app.core.errors import ConfigError

ARGS = "data.benchmark_args"
FILE_SUFFIXES = (".jsonl", ".txt", ".csv")
# The default stream: a "general" stage first (its held-out split is the general column),
# then the domains it is adapted to.
DEFAULT_DOMAINS: tuple[Any, ...] = (
    {"name": "general", "sources": ["encyclopedia", "docs"]},
    "news",
    "forum",
    "reviews",
)
# A Usenet post's header block, flattened into its first line, ends at "Lines: N"; it names
# the newsgroup (the forum domain's label), so the built-in forum domain drops it.
USENET_HEADER = re.compile(r"^.*?\bLines:\s*\d+\s+", re.DOTALL)
SOURCE_KEYS = {
    "name", "path", "hf", "sources", "form", "text_field", "label_field", "prompt_field",
    "answer_field", "config", "split", "max_documents", "strip_usenet_headers",
}  # fmt: skip


@dataclass(frozen=True)
class Document:
    """One row: ``text`` (lm form), and ``label`` or ``prompt``/``answer`` (instruction form).
    ``where`` says where it came from (``file:line``), for error messages."""

    text: str
    label: str | None = None
    prompt: str | None = None
    answer: str | None = None
    where: str = ""


@dataclass
class Source:
    """One readable source of documents (see the module docstring)."""

    kind: str  # "file", "folder", "docs" or "hf"
    location: str
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    config: str | None = None
    split: str = "train"
    strip_usenet_headers: bool = False


@dataclass
class Domain:
    """A domain: one experience of the stream, read from one or more sources."""

    name: str
    sources: list[Source]
    form: str
    max_documents: int | None = None
    field_name: str = f"{ARGS}.domains"
    documents: list[list[Document]] = field(default_factory=list)


def _source(entry: Any, data_root: str, where: str, options: dict[str, Any]) -> Source:
    """The source a string entry names (a built-in name or a path), with ``options``."""
    keep = {k: v for k, v in options.items() if k in Source.__dataclass_fields__}
    if entry == "docs":
        return Source("docs", "pydoc_data.topics", **keep)
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"{where}: expected a name, a path or a mapping, got {entry!r}")
    if "/" not in entry and "\\" not in entry and not entry.endswith(FILE_SUFFIXES):
        root = Path(data_root)
        if not root.is_dir():
            raise ConfigError(
                f"{ARGS}.data_root: no folder '{root}' (from {Path.cwd()}) for domain '{entry}';"
                " set data_root to a folder of <name>.jsonl files, or list file paths in domains"
            )
        path = root / f"{entry}.jsonl"
        if entry == "forum":  # the built-in forum: drop the headers naming its label
            keep.setdefault("strip_usenet_headers", True)
    else:
        path = Path(entry)
    if not path.exists():
        raise ConfigError(
            f"{where}: no file or folder at '{path}'; point it at a .jsonl, .txt or .csv file"
            " or a folder of them"
        )
    return Source("folder" if path.is_dir() else "file", str(path), **keep)


def parse_domains(entries: Sequence[Any] | None, data_root: str, form: str) -> list[Domain]:
    """The domains ``entries`` name (``None``: :data:`DEFAULT_DOMAINS`), each with a name
    and a form (``lm`` or ``instruction``)."""
    entries = list(DEFAULT_DOMAINS if entries is None else entries)
    if not entries:
        raise ConfigError(f"{ARGS}.domains: empty; list at least one domain")
    domains = []
    for i, entry in enumerate(entries):
        where = f"{ARGS}.domains[{i}]"
        if isinstance(entry, dict):
            unknown = set(entry) - SOURCE_KEYS
            if unknown:
                raise ConfigError(
                    f"{where}: unknown keys {sorted(unknown)}; use {sorted(SOURCE_KEYS)}"
                )
            given = [k for k in ("path", "hf", "sources") if k in entry]
            if len(given) != 1:
                raise ConfigError(f"{where}: give exactly one of path, hf or sources, got {given}")
            options = {k: v for k, v in entry.items() if k not in ("path", "hf", "sources")}
            if "hf" in entry:
                sources = [Source("hf", str(entry["hf"]), **{
                    k: v for k, v in options.items() if k in Source.__dataclass_fields__
                })]  # fmt: skip
            else:
                listed = entry["sources"] if "sources" in entry else [entry["path"]]
                sources = [_source(s, data_root, where, options) for s in listed]
            named = entry.get("path") or entry.get("hf") or f"domain{i}"
            name = str(entry.get("name") or Path(str(named)).stem)
            domain_form = entry.get("form", form)
            max_documents = entry.get("max_documents")
        else:
            sources = [_source(entry, data_root, where, {})]
            name, domain_form, max_documents = Path(str(entry)).stem, form, None
        if domain_form not in ("lm", "instruction"):
            raise ConfigError(f"{where}.form: 'lm' or 'instruction', got {domain_form!r}")
        domains.append(Domain(name, sources, domain_form, max_documents, where))
    return domains


def utf8_lines(path: Path, field: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a file, decoded strictly as UTF-8, one line at a time; a
    bad byte is refused with the file and its byte offset."""
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(
                    f"{field}: '{path}' is not UTF-8 (byte {offset + err.start}, line {number});"
                    " convert it (e.g. iconv -t UTF-8) or remove the bad bytes"
                ) from None
            offset += len(raw)


def _row(row: dict[str, Any], source: Source, where: str) -> Document:
    def get(name: str) -> str | None:
        value = row.get(name)
        return None if value is None else str(value)

    text = get(source.text_field) or ""
    if source.strip_usenet_headers:
        text = USENET_HEADER.sub("", text, count=1)
    return Document(
        text, get(source.label_field), get(source.prompt_field), get(source.answer_field), where
    )


def _read_file(path: Path, source: Source, field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in utf8_lines(path, field):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"{field}: '{path}' line {number} is not JSON ({err.msg}); write one JSON "
                    "object per line"
                ) from None
            if not isinstance(row, dict):
                raise ConfigError(f"{field}: '{path}' line {number} is not a JSON object")
            yield _row(row, source, f"'{path}' line {number}")
    elif suffix == ".csv":
        lines = (line for _, line in utf8_lines(path, field))
        reader = csv.DictReader(lines)
        columns = {source.text_field, source.prompt_field}
        if reader.fieldnames is not None and not columns & set(reader.fieldnames):
            raise ConfigError(
                f"{field}.text_field: '{path}' has no column '{source.text_field}' (columns: "
                f"{reader.fieldnames}); name the text column with text_field"
            )
        for number, row in enumerate(reader, start=2):
            yield _row(row, source, f"'{path}' row {number}")
    elif suffix == ".txt":
        paragraph: list[str] = []
        start = 1
        for number, line in utf8_lines(path, field):
            if line.strip():
                paragraph.append(line.rstrip("\n"))
                continue
            if paragraph:
                yield Document("\n".join(paragraph), where=f"'{path}' line {start}")
            paragraph, start = [], number + 1
        if paragraph:
            yield Document("\n".join(paragraph), where=f"'{path}' line {start}")
    else:
        raise ConfigError(f"{field}: '{path}' is not .jsonl, .txt or .csv; convert it")


def _read_docs() -> Iterator[Document]:
    """Python's own documentation topics: a technical-docs domain on any machine."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(topics[name], where=f"pydoc_data.topics['{name}']")


def _read_hf(source: Source, field: str) -> Iterator[Document]:
    """A Hugging Face dataset, streamed (never the whole corpus in memory)."""
    try:
        import datasets  # pyright: ignore[reportMissingImports] - optional, installed by users
    except ImportError:
        raise ConfigError(
            f"{field}: Hugging Face dataset '{source.location}' needs the 'datasets' package "
            "(pip install datasets, with internet); offline, point path at a local .jsonl/.txt"
            " file or folder"
        ) from None
    try:
        rows = datasets.load_dataset(
            source.location, source.config, split=source.split, streaming=True
        )
        for number, row in enumerate(rows):
            yield _row(dict(row), source, f"{source.location}[{number}]")
    except (ConnectionError, OSError, ValueError) as err:  # offline, or no such dataset
        raise ConfigError(
            f"{field}: cannot read Hugging Face dataset '{source.location}' (no internet, or "
            f"no such dataset: {' '.join(str(err).split())[:160]}); offline, point path at a "
            "local .jsonl/.txt/.csv file or folder"
        ) from None


def read_source(source: Source, field: str) -> Iterator[Document]:
    """The documents of one source, lazily, in a fixed order."""
    if source.kind == "docs":
        yield from _read_docs()
    elif source.kind == "hf":
        yield from _read_hf(source, field)
    elif source.kind == "folder":
        files = sorted(p for p in Path(source.location).rglob("*") if p.suffix in FILE_SUFFIXES)
        if not files:
            raise ConfigError(
                f"{field}: folder '{source.location}' holds no .jsonl, .txt or .csv file"
            )
        for path in files:
            yield from _read_file(path, source, field)
    else:
        yield from _read_file(Path(source.location), source, field)


def read_domain(domain: Domain, max_documents: int | None) -> list[list[Document]]:
    """Each source's documents (non-empty text or a prompt), at most ``max_documents`` per
    source; a source without any is refused."""
    cap = domain.max_documents or max_documents
    if any(s.kind == "hf" for s in domain.sources) and cap is None:
        cap = 10_000  # a streamed corpus is cut, never read whole
    per_source = []
    for source in domain.sources:
        docs: list[Document] = []
        for doc in read_source(source, domain.field_name):
            if doc.text.strip() or doc.prompt:
                docs.append(doc)
            if cap is not None and len(docs) >= cap:
                break
        if not docs:
            raise ConfigError(
                f"{domain.field_name}: '{source.location}' has no documents (no non-empty "
                f"'{source.text_field}' field); fill it or remove it from domains"
            )
        per_source.append(docs)
    return per_source
