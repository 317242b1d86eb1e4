"""dataset=text_csv: texts -> (N, max_len) token ids with padding id 0, a vocabulary from the train split only,
rebuilt identically from the same file and config (what eval/quantize/export rely on)."""

from __future__ import annotations

import pytest
import torch

from dlrun import data
from dlrun.config import validate
from dlrun.core.errors import UsageError
from dlrun.data.text import PAD, UNKNOWN, encode, vocabulary

CPU = torch.device("cpu")
NAMES = {
    "en": ["smith", "brown", "taylor", "wilson", "johnson", "roberts"],
    "jp": ["sato", "suzuki", "tanaka", "watanabe", "yamamoto", "nakamura"],
    "it": ["rossi", "russo", "ferrari", "esposito", "bianchi", "colombo"],
}


def names_csv(path, repeats: int = 3):
    rows = [f"{name},{lang}" for _ in range(repeats) for lang, names in NAMES.items() for name in names]
    path.write_text("name,language\n" + "\n".join(rows) + "\n")
    return path


def build(path, *overrides: str) -> data.Data:
    cfg = validate.validate("train", ["dataset=text_csv", f"dataset.path={path}", *overrides])
    return data.build(cfg.dataset, CPU)


def test_char_tokens_padded_with_zero_and_lengths_recoverable(tmp_path):
    d = build(names_csv(tmp_path / "names.csv"), "dataset.text=name", "dataset.label=language", "dataset.max_len=8")
    assert d.task == "classification" and d.class_names == ["en", "it", "jp"] and d.num_outputs == 3
    assert d.input_shape == (8,) and d.train.x.dtype == torch.long and d.train.x.shape[1] == 8
    assert d.vocab_size is not None and int(d.train.x.max()) < d.vocab_size
    lengths = (d.train.x != PAD).sum(1)
    assert lengths.min() >= 4 and lengths.max() == 8  # "yamamoto" (8), "johnson" (7) ... "sato" (4)
    # padding only after the text: a right-padded row has no token after its first PAD
    first_pad = torch.where(d.train.x == PAD, torch.arange(8), 8).min(1).values
    assert torch.equal(first_pad, lengths)


def test_vocabulary_is_deterministic_and_comes_from_the_train_split(tmp_path):
    path = names_csv(tmp_path / "names.csv")
    a = build(path, "dataset.text=name", "dataset.label=language")
    b = build(path, "dataset.text=name", "dataset.label=language")
    assert a.vocab_size == b.vocab_size and torch.equal(a.test.x, b.test.x)
    # the stored config's vocab_size is checked when the data is rebuilt (a changed file is caught)
    wrong = a.vocab_size + 1
    with pytest.raises(UsageError, match=f"dataset.vocab_size is {wrong}"):
        build(path, "dataset.text=name", "dataset.label=language", f"dataset.vocab_size={wrong}")


def test_word_level_unknown_tokens_and_truncation():
    vocab = vocabulary([["the", "cat"], ["the", "dog"]])
    assert vocab["<pad>"] == PAD and vocab["<unk>"] == UNKNOWN and vocab["the"] == 2  # most frequent first
    x = encode([["the", "bird", "cat", "the"], []], vocab, max_len=3)
    assert x.tolist() == [[2, UNKNOWN, vocab["cat"]], [PAD, PAD, PAD]]


def test_columns_by_index_without_header_and_bad_level(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("\n".join(f"{name},{lang}" for lang, names in NAMES.items() for name in names * 2) + "\n")
    d = build(path, "dataset.level=word")
    assert d.num_outputs == 3 and d.input_shape == (32,)
    with pytest.raises(UsageError, match="dataset.level must be one of char, word"):
        validate.validate("train", ["dataset=text_csv", f"dataset.path={path}", "dataset.level=byte"])
