"""Shared pytest setup: the repo root on sys.path, and the `slow` marker (skipped unless --runslow or DHSA_SLOW=1)."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long test (model conversion, real models); needs --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("DHSA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow or DHSA_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
