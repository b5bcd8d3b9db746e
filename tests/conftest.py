"""Shared pytest setup: the repo root on sys.path, the `slow` marker (skipped unless --runslow or DHSA_SLOW=1), every
test starting from the same random seed, and the `rss_growth_mib` fixture for memory tests."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


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


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from seed 0 (torch and random), so an unseeded draw gives the same numbers whichever tests
    ran before it, alone or in the whole suite."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture
def rss_growth_mib():
    """Run `setup` then `work` (Python source) in a fresh interpreter; return how much its peak resident memory
    grew during `work`, in MiB (a fresh process, so earlier tests' allocations do not hide the growth)."""
    def measure(setup: str, work: str) -> int:
        code = (f"import resource\n{setup}\n"
                "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                f"{work}\n"
                "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
        if result.returncode:
            pytest.fail(f"the measured code failed:\n{result.stderr[-3000:]}")
        return int(result.stdout.strip().splitlines()[-1])
    return measure
