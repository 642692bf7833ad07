"""Bad inputs to text streams: each a one-line ConfigError naming the field and the fix."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from mneme.app.core.errors import ConfigError
from mneme.datamodules import ContinualDataModule, TextDomains, check_block_size
from mneme.datamodules.text.tokenizer import train_tokenizer

ARGS = "data.benchmark_args"


def refused(call, *fields: str) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip()
    for field in fields:
        assert field in message
    return message


def good_jsonl(path: Path, n: int = 6) -> str:
    rows = [{"text": f"document number {i} about rockets and the moon"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path: Path, domains, **kwargs):
    kwargs = {"block_size": 32, "vocab_size": 300, "cache_dir": str(tmp_path / "c"), **kwargs}
    return lambda: TextDomains(domains, **kwargs)


def test_empty_domain_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    refused(build(tmp_path, [good_jsonl(tmp_path / "a.jsonl"), str(empty)]), f"{ARGS}.domains[1]")
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "  "}) + "\n", encoding="utf-8")
    refused(build(tmp_path, [str(blank)]), f"{ARGS}.domains[0]", "no documents")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".csv"])
def test_not_utf8_names_file_and_byte(tmp_path, suffix):
    first = {".jsonl": b'{"text": "fine"}\n', ".txt": b"fine\n", ".csv": b"text\nfine\n"}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(first + b"caf\xe9 au lait\n")
    message = refused(build(tmp_path, [str(path)]), f"{ARGS}.domains[0]", str(path))
    assert f"byte {len(first) + 3}" in message


def test_instruction_row_without_answer(tmp_path):
    path = good_jsonl(tmp_path / "plain.jsonl")
    message = refused(build(tmp_path, [path], form="instruction"), f"{ARGS}.domains[0]")
    assert "no answer" in message and "line" in message


def test_block_size_beyond_positions(tmp_path):
    refused(lambda: check_block_size(128, 64, "model.block_size"), "model.block_size", "64")
    path = good_jsonl(tmp_path / "a.jsonl")
    refused(build(tmp_path, [path], block_size=128, max_positions=64), f"{ARGS}.block_size")


def test_model_folder_without_tokenizer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}", encoding="utf-8")
    path = good_jsonl(tmp_path / "a.jsonl")
    message = refused(build(tmp_path, [path], tokenizer=str(model)), f"{ARGS}.tokenizer")
    assert "holds no tokenizer" in message
    refused(build(tmp_path, [path], tokenizer=str(tmp_path / "absent")), f"{ARGS}.tokenizer")


def test_tokenizer_folder_is_used(tmp_path):
    path = good_jsonl(tmp_path / "a.jsonl")
    trained = TextDomains([path], block_size=32, vocab_size=300, cache_dir=str(tmp_path / "c"))
    again = TextDomains([path], block_size=32, tokenizer=trained.tokenizer_dir)
    assert again.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    assert again.tokenizer_dir == trained.tokenizer_dir


def test_missing_paths(tmp_path):
    refused(build(tmp_path, [str(tmp_path / "nope.jsonl")]), f"{ARGS}.domains[0]", "nope.jsonl")
    refused(build(tmp_path, ["news"], data_root=str(tmp_path / "none")), f"{ARGS}.data_root")


def test_hf_dataset_offline(tmp_path, monkeypatch):
    entry = [{"name": "wiki", "hf": "wikitext"}]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    message = refused(build(tmp_path, entry), f"{ARGS}.domains[0]", "wikitext")
    assert "pip install datasets" in message and "local" in message

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    message = refused(build(tmp_path, entry), f"{ARGS}.domains[0]", "no internet")
    assert "local" in message


def test_bad_templates_and_forms(tmp_path):
    path = good_jsonl(tmp_path / "a.jsonl")
    refused(build(tmp_path, [path], template="{text.__class__}"), f"{ARGS}.template")
    refused(build(tmp_path, [path], form="chat"), f"{ARGS}.form")
    refused(build(tmp_path, [{"path": path, "hf": "x"}]), f"{ARGS}.domains[0]")
    refused(build(tmp_path, [path, path]), f"{ARGS}.domains")  # the same name twice


def test_errors_reach_the_datamodule_as_one_line(tmp_path):
    dm = ContinualDataModule(
        benchmark="mneme.datamodules.TextDomains",
        benchmark_args={"domains": [str(tmp_path / "gone.jsonl")]},
    )
    refused(lambda: dm.scenario, f"{ARGS}.domains[0]")


def test_cached_tokenizer_is_never_rewritten(tmp_path):
    texts = [f"line {i} of a small corpus about orbits" for i in range(50)]
    _, folder = train_tokenizer(texts, 280, str(tmp_path))
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    _, again = train_tokenizer(texts, 280, str(tmp_path))
    assert again == folder and (folder / "tokenizer.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging left behind
