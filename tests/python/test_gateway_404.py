"""The gateway's 404: what Azure answers every call when the api-version is retired or wrong,
`{"error":{"code":"404","message":"Resource not found"}}`, from `--gateway-404` or the test
control `POST /_emulator/gateway-404?on=true|false`, as the real `openai` client sees it."""

from __future__ import annotations

import openai
import pytest

from support import chat_file, create, wait_for


def assert_gateway_404(call) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        call()
    assert raised.value.body == {"code": "404", "message": "Resource not found"}


@pytest.mark.parametrize("style", ["azure", "v1"])
def test_every_call_gets_the_gateway_404_while_on(start_emulator, containers, style):
    emulator = start_emulator(step_ms=0)
    client = getattr(emulator, style)(max_retries=0)
    url = containers.upload("input.jsonl", chat_file(2))
    batch = create(client, url, containers.output_url)

    assert emulator.control("gateway-404", on="true") == (200, {"gateway_404": True})
    assert_gateway_404(lambda: client.batches.retrieve(batch.id))
    assert_gateway_404(lambda: client.batches.list())
    assert_gateway_404(lambda: client.batches.cancel(batch.id))
    assert_gateway_404(lambda: create(client, url, containers.output_url))
    # The batch goes on meanwhile, as Azure's do: the control routes are not behind it.
    status, stepped = emulator.control("step", id=batch.id, steps=10)
    assert status == 200 and stepped["data"][0]["status"] == "completed"

    assert emulator.control("gateway-404", on="false") == (200, {"gateway_404": False})
    assert wait_for(client, batch.id).status == "completed"
    assert [b.id for b in client.batches.list()] == [batch.id], "the refused create made none"


def test_the_flag_starts_with_it_on_and_the_control_checks_its_value(start_emulator):
    emulator = start_emulator("--gateway-404")
    assert_gateway_404(lambda: emulator.azure(max_retries=0).batches.list())
    status, body = emulator.control("gateway-404", on="yes")
    assert status == 400 and body["error"]["param"] == "on"
    emulator.control("gateway-404", on="false")
    assert emulator.azure().batches.list().data == []
