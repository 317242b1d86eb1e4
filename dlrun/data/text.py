"""Your own short texts: `dataset=text_csv` turns a text column and a label column into token-id sequences.

The notes' "which language is this name from" classifier: characters (or words) -> ids from a vocabulary
built on the train split only (most frequent first, ties alphabetical, so the same file and split_seed give
the same vocabulary at eval time), id 0 = padding and id 1 = unknown token. Each text becomes a row of
`max_len` ids (truncated, right-padded with 0): a recurrent model recovers the lengths as (x != 0).sum(1)
and packs the padded sequences. Token ids are never standardized.
"""

from __future__ import annotations

from collections import Counter

import torch

from dlrun.core.errors import UsageError
from dlrun.data.splits import Data, TensorSplit, checked_meta, split_indices
from dlrun.data.tables import class_indices, column_index, read_rows

PAD, UNKNOWN = 0, 1
SPECIAL = ("<pad>", "<unk>")


def text_csv(
    *,
    path,
    text,
    label,
    level,
    max_len,
    lowercase,
    header,
    delimiter,
    task,
    input_shape,
    num_outputs,
    vocab_size,
    augment,
    val_fraction,
    test_fraction,
    split_seed,
) -> Data:
    if task != "classification":
        raise UsageError(f"dataset=text_csv classifies texts: dataset.task must be classification, got {task!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise UsageError(f"dataset.max_len must be an integer >= 1, got {max_len!r}")
    if header == "auto":  # columns given by name need a header row; texts give no numbers to detect one by
        header = isinstance(text, str) or isinstance(label, str)
    names, rows = read_rows(path, header, delimiter)
    width = len(names)
    text_col = column_index(0 if text is None else text, names, width, path, "text")
    label_col = column_index(-1 if label is None else label, names, width, path, "label")
    texts = [row[text_col].lower() if lowercase else row[text_col] for row in rows.values()]
    y, class_names = class_indices([row[label_col] for row in rows.values()], path)
    token_lists = [tokenize(t, level) for t in texts]
    train_idx, val_idx, test_idx = split_indices(len(texts), val_fraction, test_fraction, split_seed)
    vocab = vocabulary(token_lists[i] for i in train_idx.tolist())
    if vocab_size is not None and vocab_size != len(vocab):
        raise UsageError(
            f"{path} gives a vocabulary of {len(vocab)} tokens, but dataset.vocab_size is {vocab_size} "
            "(the file or its split changed since the model was trained?)"
        )
    x = encode(token_lists, vocab, max_len)
    meta = checked_meta(task, input_shape, num_outputs, augment, (max_len,), len(class_names), str(path))
    return Data(
        task=task,
        train=TensorSplit(x[train_idx], y[train_idx]),
        val=TensorSplit(x[val_idx], y[val_idx]),
        test=TensorSplit(x[test_idx], y[test_idx]),
        class_names=class_names,
        vocab_size=len(vocab),
        **meta,
    )


def tokenize(text: str, level: str) -> list[str]:
    if level == "char":
        return list(text.strip())
    if level == "word":
        return text.split()
    raise UsageError(f"dataset.level must be char or word, got {level!r}")


def vocabulary(token_lists) -> dict[str, int]:
    """Token -> id: the special tokens, then the train split's tokens by frequency (ties alphabetical)."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    ordered = sorted((t for t in counts if t not in SPECIAL), key=lambda token: (-counts[token], token))
    return {token: i for i, token in enumerate([*SPECIAL, *ordered])}


def encode(token_lists: list[list[str]], vocab: dict[str, int], max_len: int) -> torch.Tensor:
    """(N, max_len) long ids: truncated to max_len, unknown tokens -> UNKNOWN, right-padded with PAD."""
    x = torch.full((len(token_lists), max_len), PAD, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids = [vocab.get(token, UNKNOWN) for token in tokens[:max_len]]
        x[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return x
