import os
import random

import pytest


@pytest.fixture
def seed():
    """A fresh seed per test run, printed so a failure can be replayed."""
    s = int(os.environ.get("TEST_SEED", random.randrange(1 << 30)))
    print(f"seed={s} (set TEST_SEED={s} to replay)")
    return s
