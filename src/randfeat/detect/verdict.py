"""What a detector says about each query it observed: [Verdict][randfeat.detect.verdict.Verdict]."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Verdict"]


@dataclass(frozen=True)
class Verdict:
    """The detector's answer for one batch of queries of one account, row by row.

    Every row was compared with every live stored query (through the index) and with the earlier
    rows of its own batch, then stored. `score` is the similarity to the closest of them (the
    detector's measure: shared hashes for Blacklight, `1 - ` a distance for ours; 0 when none
    shares a key); a row is flagged when `score > threshold`.

    Attributes:
        flagged: `[N]` bool, `score > threshold`.
        score: `[N]` float32, the similarity to the closest earlier query.
        threshold: the threshold the rows were flagged at.
        ids: `[N]` int64, the stored numbers of these rows (consecutive).
        match: `[N]` int64, the stored number of the closest earlier query, `-1` when none.
        same_account: `[N]` bool, whether that query came from the same account (`False` when
            none); with an account per client, `True` means the client's own earlier query.
        match_account: the account of that query for each row, `None` when none.
        match_tag: the tag it was stored with (`observe(..., tag=...)`), `None` when none or
            untagged; an evaluation tags benign traffic to tell "flagged by the attack's own
            query" from "flagged by a stored benign image".
        account: the account these rows were observed for.
    """

    flagged: Tensor
    score: Tensor
    threshold: float
    ids: Tensor
    match: Tensor
    same_account: Tensor
    match_account: tuple[str | None, ...]
    match_tag: tuple[str | None, ...]
    account: str

    def __len__(self) -> int:
        return int(self.flagged.shape[0])

    @property
    def n_flagged(self) -> int:
        """How many rows were flagged (a host-side int)."""
        return int(self.flagged.sum())

    def to_json(self) -> dict[str, Any]:
        """The verdict as JSON-ready lists (for logs and the server's usage records)."""
        return {
            "flagged": self.flagged.tolist(),
            "score": [float(s) for s in self.score.tolist()],
            "threshold": self.threshold,
            "ids": self.ids.tolist(),
            "match": self.match.tolist(),
            "same_account": self.same_account.tolist(),
            "match_account": list(self.match_account),
            "match_tag": list(self.match_tag),
            "account": self.account,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        """The inverse of `to_json` (tensors on the CPU)."""
        return cls(
            flagged=torch.tensor(data["flagged"], dtype=torch.bool),
            score=torch.tensor(data["score"], dtype=torch.float32),
            threshold=float(data["threshold"]),
            ids=torch.tensor(data["ids"], dtype=torch.long),
            match=torch.tensor(data["match"], dtype=torch.long),
            same_account=torch.tensor(data["same_account"], dtype=torch.bool),
            match_account=tuple(data["match_account"]),
            match_tag=tuple(data["match_tag"]),
            account=str(data["account"]),
        )
