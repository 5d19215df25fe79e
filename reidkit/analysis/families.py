"""Rank-1 errors inside look-alike families of the synthetic set.

The synthetic set (``reidkit synth``, docs/synth.md) draws identities in look-alike
families that share every cue except one or two small local ones; ``meta.json`` lists
each identity's family. A model that only sees the salient cues confuses family members,
so the share of its rank-1 errors whose wrong rank-1 image belongs to *another member of
the query's family* measures how much it misses the secondary cues (the SCR paper's
"very similar clothes" category, which the synthetic set makes countable).

- :func:`synth_meta_for` finds ``meta.json`` of a dataset's folder (``None`` for real
  datasets);
- :func:`family_of_pids` maps every pid to its family id (``None``: no family);
- :func:`family_error_share` splits rank-1 mismatches into *in family*, *distractor*
  (the wrong rank-1 is a ``0000`` distractor image, whose family the file name does not
  tell) and *other*, and gives the chance level: the share of a query's wrong-identity
  gallery images that are family members, averaged over the mismatched queries (what
  the share would be if the wrong rank-1 were drawn uniformly from the wrong images).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reidkit.viz.mismatches import RankOneMismatches

__all__ = [
    "FamilyErrorShare",
    "synth_meta_for",
    "family_of_pids",
    "family_error_share",
]


@dataclass(frozen=True)
class FamilyErrorShare:
    """Rank-1 errors by where the wrong rank-1 comes from.

    ``num_errors = in_family + distractor + other``; ``share`` is ``in_family /
    num_errors``; ``chance`` the share expected from a wrong rank-1 drawn uniformly among
    the query's wrong-identity gallery images (distractors included, as non-family).
    """

    num_errors: int
    in_family: int
    distractor: int
    other: int
    chance: float

    @property
    def share(self) -> float:
        return self.in_family / self.num_errors if self.num_errors else 0.0

    def summary(self) -> str:
        if not self.num_errors:
            return "no rank-1 errors"
        return (
            f"{self.in_family}/{self.num_errors} rank-1 errors ({100 * self.share:.1f}%) retrieve "
            f"another member of the query's look-alike family (chance {100 * self.chance:.1f}%); "
            f"{self.distractor} a distractor, {self.other} another identity"
        )


def synth_meta_for(dataset: Any) -> dict[str, Any] | None:
    """The synthetic set's ``meta.json`` of ``dataset`` (a ReIDDataset), found next to its
    split folders; ``None`` when there is none (a real dataset)."""
    records = getattr(dataset, "query", None) or getattr(dataset, "gallery", None) or []
    if not records:
        return None
    path = Path(records[0].path).parent.parent / "meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("identities"), dict):
        raise ValueError(f"{path}: expected the synthetic set's meta with an 'identities' map")
    return meta


def family_of_pids(meta: Mapping[str, Any]) -> dict[int, int | None]:
    """``{pid: family id or None}`` from a synthetic ``meta.json`` (``identities`` map with
    ``"0002": {"family": 17, ...}``)."""
    out: dict[int, int | None] = {}
    for key, entry in meta["identities"].items():
        fam = entry.get("family") if isinstance(entry, Mapping) else None
        out[int(key)] = int(fam) if fam is not None else None
    return out


def family_error_share(
    mismatches: RankOneMismatches,
    q_pids: Any,
    g_pids: Any,
    families: Mapping[int, int | None],
) -> FamilyErrorShare:
    """Split the rank-1 errors of ``mismatches`` by the family of the wrong rank-1.

    Args:
        mismatches: :func:`reidkit.viz.mismatches.rank1_mismatches` of an evaluation.
        q_pids, g_pids: query / gallery identities (``0`` = distractor).
        families: :func:`family_of_pids`.

    Wrong-identity gallery images are never junk in the protocol, so the chance level needs
    no cameras. Distractors count as non-family (about a third of them are in fact extra
    look-alikes of test families, which the names do not tell), so both the share and the
    chance level are lower bounds.
    """
    qp = np.asarray(torch.as_tensor(q_pids).cpu()).astype(np.int64)
    gp = np.asarray(torch.as_tensor(g_pids).cpu()).astype(np.int64)
    gfam = np.array([_fam(families, int(p)) for p in gp], dtype=np.int64)
    in_family = distractor = other = 0
    chances = []
    for m in mismatches:
        q, w = int(qp[m.query]), int(gp[m.wrong])
        fam = _fam(families, q)
        if w == 0:
            distractor += 1
        elif fam >= 0 and _fam(families, w) == fam:
            in_family += 1
        else:
            other += 1
        wrong = gp != q
        n_wrong = int(wrong.sum())
        if n_wrong:
            same_fam = wrong & (gfam == fam) & (fam >= 0) & (gp != 0)
            chances.append(int(same_fam.sum()) / n_wrong)
    return FamilyErrorShare(
        num_errors=len(mismatches),
        in_family=in_family,
        distractor=distractor,
        other=other,
        chance=float(np.mean(chances)) if chances else 0.0,
    )


def _fam(families: Mapping[int, int | None], pid: int) -> int:
    fam = families.get(pid)
    return -1 if fam is None else int(fam)
