from __future__ import annotations

import pytest

from bicep_model import Deployment


@pytest.fixture(scope="session")
def deployment() -> Deployment:
    return Deployment.load()
