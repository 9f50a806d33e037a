"""The real-file cache (tests/real_files.py) uses only the pinned bytes."""

from __future__ import annotations

import shutil

import pytest

from tests.real_files import OPENSLIDE_PYTHON, ChecksumError, fetch, sha256_file


def test_cache_holds_exactly_the_pinned_files(openslide_fixtures):
    names = {p.name for p in openslide_fixtures.iterdir()}
    assert names == set(OPENSLIDE_PYTHON.files())   # only the members named, no temp files left
    for name, sha in OPENSLIDE_PYTHON.files().items():
        assert sha256_file(openslide_fixtures / name) == sha


def test_a_changed_file_is_refused_not_used(openslide_fixtures, tmp_path):
    copy = tmp_path / OPENSLIDE_PYTHON.folder_name
    shutil.copytree(openslide_fixtures, copy)
    assert fetch(OPENSLIDE_PYTHON, root=tmp_path) == copy   # complete: no download
    data = bytearray((copy / "small.svs").read_bytes())
    data[-1] ^= 0xFF
    (copy / "small.svs").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"small\.svs: sha256 [0-9a-f]{64}, expected 01ab0fea.*delete the file"):
        fetch(OPENSLIDE_PYTHON, root=tmp_path)
