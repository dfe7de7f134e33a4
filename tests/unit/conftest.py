"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def executor():  # noqa: ANN201
    """The host's executor on the real backbone, loaded once for all extension tests
    (it keeps no state between batches)."""
    from fmplex.backbones import get_backbone
    from fmplex.triton_backend.executor import Executor

    return Executor(get_backbone("minilm"))
