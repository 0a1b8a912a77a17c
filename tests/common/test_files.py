"""common.files: a file replaced whole, never through a planted link."""

from __future__ import annotations

import os
import stat

import pytest

from counter_server.common.files import replace_file


def test_the_file_holds_the_data_with_its_mode_and_nothing_else_is_left(tmp_path):
    path = tmp_path / "state"
    replace_file(str(path), b"first", durable=True)
    replace_file(str(path), b"second", mode=0o600)
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


def test_a_link_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "state").symlink_to(victim)
    replace_file(str(tmp_path / "state"), b"new")
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "state").is_symlink()


def test_a_failed_rename_leaves_no_temporary(tmp_path):
    (tmp_path / "state").mkdir()  # a directory cannot be replaced by a file
    with pytest.raises(IsADirectoryError):
        replace_file(str(tmp_path / "state"), b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    assert os.listdir(tmp_path / "state") == []
