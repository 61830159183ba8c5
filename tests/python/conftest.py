"""Fixtures: one Azurite for the session, emulators started per need, fresh containers per test.

Every process is started on port 0 and stopped at teardown, so nothing is left running.
"""

from __future__ import annotations

import uuid

import pytest

from support import DEPLOYMENT, Azurite, Emulator


@pytest.fixture(scope="session")
def azurite():
    service = Azurite()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def blob_service(azurite):
    return azurite.service()


@pytest.fixture(scope="session")
def emulator(azurite):
    """A fast emulator for tests that need no special flags."""
    service = Emulator(azurite, ["--step-ms", "50", "--deployment", DEPLOYMENT])
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def start_emulator(azurite):
    """Starts an emulator with the given extra flags (step 50 ms and the test deployment
    unless overridden); all are stopped when the test ends."""
    started: list[Emulator] = []

    def start(*args: str, step_ms: int = 50, deployments=(DEPLOYMENT,)) -> Emulator:
        flags = ["--step-ms", str(step_ms)]
        for name in deployments:
            flags += ["--deployment", name]
        service = Emulator(azurite, flags + list(args))
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


class Containers:
    """A fresh input and output container, so a test sees only its own blobs."""

    def __init__(self, azurite: Azurite) -> None:
        suffix = uuid.uuid4().hex[:12]
        self.service = azurite.service()
        self.account_url = azurite.account_url
        self.input = self.service.create_container(f"in-{suffix}")
        self.output = self.service.create_container(f"out-{suffix}")
        self.output_url = f"{azurite.account_url}/{self.output.container_name}"

    def upload(self, name: str, data: bytes) -> str:
        self.input.upload_blob(name, data, overwrite=True)
        return f"{self.account_url}/{self.input.container_name}/{name}"

    def outputs(self) -> list[str]:
        return sorted(b.name for b in self.output.list_blobs())


@pytest.fixture
def containers(azurite):
    return Containers(azurite)
