"""The control plane: both URL styles, authentication, create-request checks, list
pagination, unknown ids, and injected throttling and server errors."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from support import API_KEY, chat_file, create, wait_for


def http(method: str, url: str, headers: dict | None = None, body: dict | None = None):
    """A bare request, for what the `openai` clients will not send (no key, no api-version)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.mark.parametrize("path", ["/openai/batches?api-version=2025-04-01-preview", "/openai/v1/batches"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_no_key_is_401_with_azure_error_json(emulator, path, method):
    status, _, body = http(method, emulator.endpoint + path, body={} if method == "POST" else None)
    assert status == 401
    assert body["error"]["code"] == "401"
    assert "Access denied" in body["error"]["message"]


def test_a_bearer_token_or_an_api_key_is_enough(emulator):
    for headers in ({"api-key": API_KEY}, {"Authorization": "Bearer some-entra-token"}):
        status, _, body = http("GET", emulator.endpoint + "/openai/v1/batches", headers)
        assert status == 200 and body["object"] == "list"


def test_a_wrong_key_style_is_an_authentication_error(emulator):
    client = openai.OpenAI(base_url=f"{emulator.endpoint}/openai/v1/", api_key="k",
                           default_headers={"Authorization": "Basic abc"})
    with pytest.raises(openai.AuthenticationError):
        client.batches.list()


def test_the_classic_style_needs_an_api_version(emulator):
    status, _, body = http("GET", emulator.endpoint + "/openai/batches", {"api-key": API_KEY})
    # What Azure answers without api-version: a 404, not a 400.
    assert status == 404
    assert body == {"error": {"code": "404", "message": "Resource not found"}}


def test_unknown_routes_and_ids_are_404(emulator):
    status, _, body = http("GET", emulator.endpoint + "/openai/files", {"api-key": API_KEY})
    assert status == 404 and body["error"]["code"] == "404"
    for client in (emulator.azure(), emulator.v1()):
        with pytest.raises(openai.NotFoundError) as raised:
            client.batches.retrieve("batch_00000000-0000-0000-0000-000000000000")
        assert raised.value.code == "not_found"
        with pytest.raises(openai.NotFoundError):
            client.batches.cancel("batch_nope")


def bad_create(client, containers, **changes):
    body = {
        "input_file_id": None,
        "endpoint": "/chat/completions",
        "completion_window": "24h",
        "extra_body": {
            "input_blob": containers.upload("input.jsonl", chat_file(1)),
            "output_folder": {"url": containers.output_url},
        },
    }
    for key, value in changes.items():
        if key in ("input_blob", "output_folder"):
            body["extra_body"][key] = value
        else:
            body[key] = value
    with pytest.raises(openai.BadRequestError) as raised:
        client.batches.create(**body)
    assert raised.value.status_code == 400
    assert len(client.batches.list(limit=100).data) == 0, "a refused create makes no batch"
    return raised.value


def test_completion_window_other_than_24h_is_400(start_emulator, containers):
    e = bad_create(start_emulator().azure(), containers, completion_window="48h")
    assert (e.code, e.param) == ("invalid_value", "completion_window")


def test_metadata_with_input_blob_is_400(start_emulator, containers):
    e = bad_create(start_emulator().azure(), containers, metadata={"owner": "me"})
    assert (e.code, e.param) == ("unsupported_parameter", "metadata")


def test_an_unsupported_endpoint_is_400(start_emulator, containers):
    e = bad_create(start_emulator().v1(), containers, endpoint="/v1/embeddings")
    assert (e.code, e.param) == ("invalid_value", "endpoint")


def test_no_input_is_400(start_emulator, containers):
    e = bad_create(start_emulator().azure(), containers, input_blob=None)
    assert (e.code, e.param) == ("missing_required_parameter", "input_blob")


def test_an_output_folder_outside_the_account_is_400(start_emulator, containers):
    e = bad_create(start_emulator().azure(), containers,
                   output_folder={"url": "https://someoneelse.blob.core.windows.net/batch-output"})
    assert e.param == "output_folder.url"


@pytest.mark.parametrize("style", ["azure", "v1"])
def test_list_pages_through_every_batch(start_emulator, containers, style):
    emulator = start_emulator(step_ms=60000)
    client = getattr(emulator, style)()
    url = containers.upload("input.jsonl", chat_file(1))
    created = [create(client, url, containers.output_url).id for _ in range(5)]
    newest_first = created[::-1]

    # The client's pager follows has_more / after by itself.
    assert [b.id for b in client.batches.list(limit=2)] == newest_first
    assert [b.id for b in client.batches.list()] == newest_first, "default limit 20 fits all"

    pages, after = [], None
    while True:
        query = {"limit": 2} | ({"after": after} if after else {})
        page = client.batches.with_raw_response.list(**query).http_response.json()
        assert page["object"] == "list"
        ids = [b["id"] for b in page["data"]]
        assert page["first_id"] == ids[0] and page["last_id"] == ids[-1]
        pages.append(ids)
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]

    page = client.batches.list(limit=2)
    assert page.has_more and page.has_next_page()
    assert [b.id for b in page.get_next_page().data] == newest_first[2:4]

    for limit in (0, 101):
        with pytest.raises(openai.BadRequestError) as raised:
            client.batches.list(limit=limit)
        assert raised.value.param == "limit"


def test_the_classic_list_takes_orderby(start_emulator, containers):
    emulator = start_emulator(step_ms=60000)
    client = emulator.azure()
    url = containers.upload("input.jsonl", chat_file(1))
    created = [create(client, url, containers.output_url).id for _ in range(3)]
    page = client.batches.list(extra_query={"$orderby": "created_at asc"})
    assert [b.id for b in page.data] == created


def test_429_is_injected_with_retry_headers(start_emulator, containers):
    emulator = start_emulator("--http-429-rate", "1.0")
    client = emulator.azure(max_retries=0)
    with pytest.raises(openai.RateLimitError) as raised:
        create(client, containers.upload("input.jsonl", chat_file(1)), containers.output_url)
    headers = raised.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["retry-after-ms"] == "1000"
    assert raised.value.body["code"] == "429"


def test_the_client_retries_through_injected_429s(start_emulator, containers):
    emulator = start_emulator("--http-429-rate", "0.5", "--seed", "3")
    url = containers.upload("input.jsonl", chat_file(2))
    attempts = emulator.azure(max_retries=0)
    outcomes = []
    for _ in range(8):
        try:
            attempts.batches.list()
            outcomes.append("ok")
        except openai.RateLimitError:
            outcomes.append("429")
    assert "ok" in outcomes and "429" in outcomes, outcomes

    client = emulator.azure(max_retries=10)
    started = time.monotonic()
    batch = create(client, url, containers.output_url)
    batch = wait_for(client, batch.id)
    assert batch.status == "completed"
    assert len(client.batches.list().data) == 1, "throttled creates made no batch"
    assert time.monotonic() - started < 30


def test_500_is_injected(start_emulator, containers):
    emulator = start_emulator("--http-500-rate", "1.0")
    client = emulator.v1(max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        create(client, containers.upload("input.jsonl", chat_file(1)), containers.output_url)
    assert raised.value.status_code == 500
    assert raised.value.code == "server_error"


def test_injected_faults_repeat_with_the_seed(start_emulator):
    def sequence():
        client = start_emulator("--http-500-rate", "0.5", "--seed", "11").v1(max_retries=0)
        seen = []
        for _ in range(12):
            try:
                client.batches.list()
                seen.append(200)
            except openai.InternalServerError:
                seen.append(500)
        return seen

    first = sequence()
    assert 200 in first and 500 in first
    assert sequence() == first
