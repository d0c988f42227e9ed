"""The one exit-code table and the atomic directory write that trainer and operator share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune_trainer import atomic, exitcodes


def test_table_has_the_contracted_codes_and_reasons() -> None:
    expected = {
        0: ("Succeeded", False),
        1: ("Crashed", True),
        2: ("InvalidConfig", False),
        3: ("DataError", False),
        4: ("ModelError", False),
        5: ("NoAccelerator", False),
        6: ("Diverged", False),
        7: ("MetricsUnavailable", False),
        75: ("Terminated", True),
    }
    assert {row.code: (row.reason, row.retried) for row in exitcodes.TABLE} == expected
    assert exitcodes.PERMANENT == {
        2: "InvalidConfig",
        3: "DataError",
        4: "ModelError",
        5: "NoAccelerator",
        6: "Diverged",
        7: "MetricsUnavailable",
    }
    assert exitcodes.reason_for(137) == "Crashed"


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "final"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError), atomic.atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]

    with atomic.atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_leftovers_are_removed_and_a_moved_aside_directory_is_put_back(tmp_path: Path) -> None:
    (tmp_path / ".tmp-checkpoint-5-0123abcd").mkdir()
    aside = tmp_path / ".tmp-final-old-89abcdef"
    aside.mkdir()
    (aside / "weights").write_text("v1")
    removed = atomic.remove_leftovers(tmp_path)
    assert [p.name for p in removed] == [".tmp-checkpoint-5-0123abcd"]
    assert (tmp_path / "final" / "weights").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["final"]
