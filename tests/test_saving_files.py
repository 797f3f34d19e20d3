"""stpnet.save writes like every other stpnet writer (stpnet._atomic): a plain file's permissions,
no temporary file left, a clear error for a path that cannot be a file."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

import stpnet
from stpnet._atomic import new_file_mode


def _small():
    torch.manual_seed(0)
    return stpnet.compress(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), "tt", rank=4)[0]


def test_a_saved_model_has_the_permissions_of_a_plain_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = stpnet.save(_small(), tmp_path / "model.pt")
        assert new_file_mode() == 0o644
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_saving_to_a_folder_or_under_a_file_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.pt").write_bytes(b"keep")
    with pytest.raises(ValueError, match="is a folder"):
        stpnet.save(_small(), tmp_path / "folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        stpnet.save(_small(), tmp_path / "file.pt" / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt", "folder"]
    assert list((tmp_path / "folder").iterdir()) == []
    assert (tmp_path / "file.pt").read_bytes() == b"keep"
