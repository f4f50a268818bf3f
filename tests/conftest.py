import os

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs (MPI sweeps, benchmarks, soak); run with -m slow")


def pytest_collection_modifyitems(config, items):
    # `-m slow` (or any -m expression naming slow) selects them; by default they are skipped
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
