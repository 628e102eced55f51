"""Session-wide test settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def state_roots_allow_the_test_temp_dir(tmp_path_factory):
    # Workers keep their history only under an allowed root (handlers/state_dir.py); the tests'
    # state directories live under pytest's base temp, which TorchServe's workers inherit here.
    base = str(tmp_path_factory.getbasetemp())
    old = os.environ.get("HETSERVE_STATE_ROOTS")
    os.environ["HETSERVE_STATE_ROOTS"] = os.pathsep.join(filter(None, [old, base]))
    yield
    if old is None:
        os.environ.pop("HETSERVE_STATE_ROOTS", None)
    else:
        os.environ["HETSERVE_STATE_ROOTS"] = old
