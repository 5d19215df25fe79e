"""Rank-1 errors inside look-alike families (synthetic set): hand-worked split and chance
level, and meta.json discovery on a generated tiny set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reidkit.analysis.families import (
    family_error_share,
    family_of_pids,
    synth_meta_for,
)
from reidkit.viz.mismatches import rank1_mismatches


def test_hand_worked_split_and_chance() -> None:
    # pids 1, 2 in family 0; 3 in family 1; 4 without a family; 0 = distractor
    families = {1: 0, 2: 0, 3: 1, 4: None}
    q_pids = torch.tensor([1, 2, 3, 4])
    g_pids = torch.tensor([1, 2, 3, 4, 0, 2])
    # distances: query 0 (pid 1) -> wrong rank-1 gallery 1 (pid 2, same family)
    #            query 1 (pid 2) -> wrong rank-1 gallery 4 (distractor)
    #            query 2 (pid 3) -> correct
    #            query 3 (pid 4) -> wrong rank-1 gallery 2 (pid 3, no common family)
    dist = torch.tensor(
        [
            [0.5, 0.1, 0.9, 0.9, 0.9, 0.9],
            [0.9, 0.6, 0.9, 0.9, 0.2, 0.7],
            [0.9, 0.9, 0.1, 0.9, 0.9, 0.9],
            [0.9, 0.9, 0.2, 0.5, 0.9, 0.9],
        ]
    )
    mm = rank1_mismatches(q_pids, g_pids, distmat=dist)
    assert [m.query for m in mm] == [0, 1, 3]
    share = family_error_share(mm, q_pids, g_pids, families)
    assert (share.num_errors, share.in_family, share.distractor, share.other) == (3, 1, 1, 1)
    assert share.share == pytest.approx(1 / 3)
    # chance: query 0 (pid 1) has 5 wrong images (pids 2, 3, 4, 0, 2), 2 in its family;
    # query 1 (pid 2) has 4 (pids 1, 3, 4, 0), 1 in its family; query 3 (pid 4): no family
    assert share.chance == pytest.approx((2 / 5 + 1 / 4 + 0 / 5) / 3)
    assert "1/3 rank-1 errors (33.3%)" in share.summary()


def test_meta_discovery_on_a_generated_set(tmp_path: Path) -> None:
    from reidkit.data.datasets import build_dataset
    from reidkit.data.synth import generate

    generate(tmp_path / "synth-tiny", preset="tiny", seed=0, progress=False)
    ds = build_dataset("synth", root=tmp_path, preset="tiny")
    meta = synth_meta_for(ds)
    assert meta is not None
    fams = family_of_pids(meta)
    assert all(int(r.pid) in fams for r in ds.query)
    multi = [f for f in meta["families"].values() if len(f["members"]) >= 2]
    assert all(len({fams[p] for p in f["members"]}) == 1 for f in multi)

    class Real:  # a real dataset has no meta.json next to its folders
        query = [type("R", (), {"path": str(tmp_path / "x" / "query" / "0001_c1.jpg")})()]

    assert synth_meta_for(Real()) is None
