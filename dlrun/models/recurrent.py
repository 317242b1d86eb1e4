"""The notes' sequence classifiers: a vanilla RNN, a GRU or an LSTM with a linear head on the last hidden state.

One class, `Recurrent(cell=rnn|gru|lstm)`, reads what the dataset gives:
- token ids (N, max_len) from dataset=text_csv (`vocab_size` set): an embedding, then the cell over the
  packed padded sequences (padding id 0, lengths = non-zero tokens), so padding never reaches the state;
- images (N, C, H, W): one row per time step (H steps of C*W features), the classic row-by-row MNIST setup;
- tabular rows (N, F): one feature per time step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlrun.core.errors import UsageError

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class Recurrent(nn.Module):
    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        cell: str = "gru",
        hidden: int = 128,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        vocab_size: int | None = None,
        embedding_dim: int = 64,
    ):
        super().__init__()
        if cell not in CELLS:
            raise UsageError(f"model.cell must be one of {', '.join(CELLS)}, got {cell!r}")
        shape = tuple(input_shape)
        self.tokens = vocab_size is not None
        self.input_dtype = torch.long if self.tokens else torch.float32  # what models.build's dry run feeds
        if self.tokens:
            if len(shape) != 1:
                raise UsageError(f"model {cell} with a vocabulary reads token ids (max_len,), not shape {list(shape)}")
            # padding_idx=0: the padding token's embedding stays zero and gets no gradient
            self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
            step_features = embedding_dim
        elif len(shape) == 3:
            step_features = shape[0] * shape[2]  # one image row, all channels
        elif len(shape) == 1:
            step_features = 1
        else:
            raise UsageError(f"model {cell} reads images (C,H,W), feature rows (F,) or tokens, not {list(shape)}")
        self.rnn = CELLS[cell](
            step_features,
            hidden,
            num_layers=layers,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,  # torch applies it between layers only
            batch_first=True,
        )
        self.directions = 2 if bidirectional else 1
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden * self.directions, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            lengths = (x != 0).sum(1).clamp_min(1).cpu()  # an empty text still gets one (padding) step
            packed = nn.utils.rnn.pack_padded_sequence(
                self.embedding(x), lengths, batch_first=True, enforce_sorted=False
            )
            _, state = self.rnn(packed)
        else:
            steps = x.permute(0, 2, 1, 3).flatten(2) if x.dim() == 4 else x.unsqueeze(-1)
            _, state = self.rnn(steps)
        hidden = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        # the last layer's final state of each direction: (layers * directions, N, hidden) -> (N, directions * hidden)
        last = hidden[-self.directions :].transpose(0, 1).flatten(1)
        return self.head(last)
