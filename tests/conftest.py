import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA GPUs (skipped on CPU machines)")


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be replayed."""
    s = int(os.environ.get("TEST_SEED", random.randrange(1 << 30)))
    print(f"seed={s} (set TEST_SEED={s} to replay)")
    return s
