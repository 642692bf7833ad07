"""Text streams for language models: packing, instruction masking, the trained tokenizer,
the seeded split, and the stream served through ContinualDataModule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from mneme.datamodules import ContinualDataModule, TextDomains, instruction_examples
from mneme.datamodules.text.packing import IGNORE_INDEX, instruction_blocks, pack_documents
from mneme.datamodules.text.tokenizer import train_tokenizer

TEXT_DOMAINS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text_domains"
WORDS = "the a rocket orbit launch moon review film plot actor story news city fire".split()


def sentences(seed: int, n: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_packing_marks_boundaries_and_cuts_exact_blocks():
    rng = random.Random(0)
    docs = [[rng.randrange(2, 50) for _ in range(rng.randrange(1, 30))] for _ in range(9)]
    eos, pad, block = 0, 1, 16
    blocks = pack_documents(docs, block, eos, pad)
    assert blocks.input_ids.shape[1] == block
    flat, mask = blocks.input_ids.flatten(), blocks.attention_mask.flatten().bool()
    assert flat[mask].tolist() == [t for d in docs for t in [*d, eos]]
    assert not mask[mask.sum() :].any()  # padding only at the very end
    assert len(blocks) == -(-int(mask.sum()) // block)
    labels = blocks.labels.flatten()
    assert torch.equal(labels[mask], flat[mask])
    assert (labels[~mask] == IGNORE_INDEX).all()


def test_instruction_masks_exactly_the_prompt_and_padding():
    prompts = [[5, 6, 7], [8] * 20, []]
    answers = [[9], [10, 11], [12, 13, 14]]
    blocks, kept = instruction_blocks(prompts, answers, 12, eos_id=0, pad_id=1, field="f")
    assert kept == [3, 9, 0]  # the long prompt keeps its end: 12 - 2 answer - 1 EOS
    for row, (n_prompt, answer) in enumerate(zip(kept, answers, strict=True)):
        target = [*answer, 0]
        end = n_prompt + len(target)
        labels = blocks.labels[row]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt:end].tolist() == target
        assert (labels[end:] == IGNORE_INDEX).all()
        assert blocks.attention_mask[row].tolist() == [1] * end + [0] * (12 - end)


def test_trained_tokenizer_is_deterministic_and_round_trips(tmp_path):
    texts = sentences(0, 200) + ["Café , naïve — 数学 ok !", "tabs\tand\nnew lines  twice"]
    first, folder_a = train_tokenizer(texts, 300, str(tmp_path / "a"))
    second, folder_b = train_tokenizer(texts, 300, str(tmp_path / "b"))
    assert folder_a.name == folder_b.name  # keyed by the texts and vocab_size
    assert (folder_a / "tokenizer.json").read_text() == (folder_b / "tokenizer.json").read_text()
    assert len(first) == 300
    for text in texts[-2:] + texts[:3]:
        ids = first(text, add_special_tokens=False)["input_ids"]
        assert ids == second(text, add_special_tokens=False)["input_ids"]
        assert first.decode(ids) == text
    other, folder_c = train_tokenizer(texts[:100], 300, str(tmp_path / "a"))
    assert folder_c != folder_a  # other texts, another cache entry, nothing overwritten


def test_a_rank_that_loses_the_race_loads_the_winners_tokenizer(tmp_path, monkeypatch):
    """Two DDP ranks train the same tokenizer at once: the second rename finds the folder
    made (by the other rank) and loads it; its own copy is removed, nothing overwritten."""
    import shutil

    from mneme.datamodules.text import tokenizer as module

    texts = sentences(7, 100)
    _, winner = train_tokenizer(texts, 300, str(tmp_path / "a"))
    real_rename = module.os.rename

    def other_rank_first(source, target):
        shutil.copytree(winner, target)
        (Path(target) / "marker").write_text("the other rank's", encoding="utf-8")
        real_rename(source, target)

    monkeypatch.setattr(module.os, "rename", other_rank_first)
    tok, folder = train_tokenizer(texts, 300, str(tmp_path / "b"))
    assert (folder / "marker").is_file()  # the other rank's folder, kept as it was
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    assert (
        tok("moon orbit")["input_ids"]
        == module.load_tokenizer(str(winner))("moon orbit")["input_ids"]
    )


def test_pydoc_stream_through_the_datamodule(tmp_path):
    path = write_jsonl(tmp_path / "space.jsonl", [{"text": t} for t in sentences(1, 30, 40)])
    args = {
        "domains": [{"name": "docs", "sources": ["docs"], "max_documents": 12}, path],
        "block_size": 32,
        "vocab_size": 384,
        "cache_dir": str(tmp_path / "cache"),
        "max_tokens": 2000,
    }
    dm = ContinualDataModule(benchmark="mneme.datamodules.TextDomains", benchmark_args=args)
    assert dm.sample_keys == ["input_ids", "label", "labels", "attention_mask", "task"]
    assert dm.num_experiences == 2 and len(dm.test_experiences) == 2
    stream = dm.declaration
    assert stream.domain_names == ("docs", "space") and stream.vocab_size == 384
    assert Path(stream.tokenizer_dir, "tokenizer.json").is_file()
    for k, experience in enumerate(dm.train_experiences + dm.test_experiences):
        t = experience.tensors
        assert all(v.dtype == torch.long for v in t.values())
        assert t["input_ids"].shape[1:] == (32,) == t["labels"].shape[1:]
        assert (t["label"] == k % 2).all() and (t["task"] == k % 2).all()
        assert int(t["input_ids"].max()) < stream.vocab_size
    assert all(n <= 2000 for n in stream.train_tokens)
    eos = stream.eos_token_id
    text = stream.tokenizer.decode(dm.train_experiences[1].tensors["input_ids"].flatten())
    assert text.count(stream.tokenizer.decode([eos])) >= 1  # boundaries marked
    assert instruction_examples(dm, "space") == []  # an lm domain


def test_instruction_stream_keeps_prompts_and_answers(tmp_path):
    rows = [{"text": s, "label": ["pos", "neg"][i % 2]} for i, s in enumerate(sentences(2, 40))]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    qa = [{"prompt": f"Q{i}: {s}\nA:", "answer": f" {i}"} for i, s in enumerate(sentences(3, 20))]
    stream = TextDomains(
        [path, {"name": "qa", "path": write_jsonl(tmp_path / "qa.jsonl", qa)}],
        form="instruction",
        block_size=48,
        vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
    )
    tok = stream.tokenizer
    for domain in (0, 1):
        examples = instruction_examples(stream, domain)
        dataset = stream.test_stream[domain].dataset
        assert len(examples) == len(dataset) >= 2
        for (prompt, answer), sample in zip(examples, dataset, strict=True):
            input_ids, label, labels = sample[0], sample[1], sample[2]
            assert label == domain
            scored = labels != IGNORE_INDEX
            assert torch.equal(input_ids[scored], labels[scored])
            assert tok.decode(labels[scored]) == answer + tok.eos_token
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            assert not scored[:n_prompt].any() and scored[n_prompt]
            assert prompt.endswith("Topic:") if domain == 0 else prompt.endswith("A:")
    assert {a for _, a in instruction_examples(stream, 0)} <= {" pos", " neg"}


def test_split_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in sentences(4, 40, 6)])

    def held_out(seed: int) -> list[str]:
        s = TextDomains([path], seed=seed, block_size=32, vocab_size=300, cache_dir=str(tmp_path))
        return [s.tokenizer.decode(x[0][x[3].bool()]) for x in s.test_stream[0].dataset]

    assert held_out(0) == held_out(0)
    assert held_out(0) != held_out(1)


@pytest.mark.skipif(not TEXT_DOMAINS.is_dir(), reason="../shared/data/text_domains absent")
def test_offline_text_domains(tmp_path):
    stream = TextDomains(
        data_root=str(TEXT_DOMAINS),
        max_documents=8,
        block_size=64,
        vocab_size=512,
        cache_dir=str(tmp_path),
        max_tokens=3000,
    )
    assert stream.domain_names == ("general", "news", "forum", "reviews")
    assert stream.general_experience == 0 and len(stream.test_stream) == 4
    general = stream.tokenizer.decode(stream.test_stream[0].dataset[0][0])
    assert general.strip()
    forum = stream.tokenizer.decode(stream.train_stream[2].dataset[0][0])
    assert "Newsgroups:" not in forum  # the header naming the label is dropped


def test_folder_txt_and_csv_sources_count_documents(tmp_path):
    folder = tmp_path / "blog"
    folder.mkdir()
    paragraphs = sentences(5, 6)
    (folder / "a.txt").write_text(
        "\n\n".join(f"{p}\nsecond line" for p in paragraphs) + "\n", encoding="utf-8"
    )
    rows = sentences(6, 5)
    (folder / "b.csv").write_text(
        "id,body\n" + "".join(f'{i},"{r}, quoted"\n' for i, r in enumerate(rows)), encoding="utf-8"
    )
    stream = TextDomains(
        [{"name": "blog", "path": str(folder), "text_field": "body"}],
        block_size=32,
        vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
    )
    eos = stream.eos_token_id
    seen = [
        x[0][x[3].bool()]
        for part in (stream.train_stream, stream.test_stream)
        for x in part[0].dataset
    ]
    ids = torch.cat(seen)
    assert int((ids == eos).sum()) == len(paragraphs) + len(rows)  # one EOS per document
    text = stream.tokenizer.decode(ids)
    assert all(f"{p}\nsecond line" in text for p in paragraphs)
    assert all(f"{r}, quoted" in text for r in rows)
