"""Webhooks: endpoints registered as the Azure OpenAI docs show
(`POST /openai/v1/dashboard/webhook_endpoints`), and the events the emulator sends when a batch
ends verified by the real `openai` client's `webhooks.unwrap`: the same check the handler
makes in Rust (src/webhook/signature.rs), so a mistake in both would show here."""

from __future__ import annotations

import http.server
import queue
import threading

import openai
import pytest

from support import chat_file, create, wait_for


class Receiver:
    """A local HTTP endpoint that records each POST (headers, exact body bytes) and answers
    the statuses it is given in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.received: queue.Queue = queue.Queue()
        statuses = list(statuses or [])
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.put(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(statuses.pop(0) if statuses else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/function-webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 30):
        return self.received.get(timeout=timeout)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def register(client: openai.OpenAI, url: str, event_types: list[str]) -> dict:
    return client.post(
        "/dashboard/webhook_endpoints",
        cast_to=object,
        body={"name": "handler", "url": url, "event_types": event_types},
    )


def test_registering_answers_the_secret_once_and_lists_the_endpoint(emulator, receiver):
    client = emulator.v1()
    created = register(client, receiver.url, ["batch.completed", "batch.failed"])
    assert created["object"] == "webhook.endpoint"
    assert created["signing_secret"].startswith("whsec_")
    assert created["signing_secret_hint"].startswith("whsec_...")
    assert created["event_types"] == ["batch.completed", "batch.failed"]

    listed = client.get("/dashboard/webhook_endpoints", cast_to=object)
    mine = [e for e in listed["data"] if e["id"] == created["id"]]
    assert mine and "signing_secret" not in mine[0], "the secret is shown only at creation"

    with pytest.raises(openai.BadRequestError):
        register(client, receiver.url, ["batch.finished"])
    client.delete(f"/dashboard/webhook_endpoints/{created['id']}", cast_to=object)
    listed = client.get("/dashboard/webhook_endpoints", cast_to=object)
    assert created["id"] not in [e["id"] for e in listed["data"]]


def test_a_finished_batch_sends_an_event_the_openai_client_verifies(start_emulator, containers, receiver):
    emulator = start_emulator(step_ms=50)
    client = emulator.v1()
    secret = register(client, receiver.url, ["batch.completed"])["signing_secret"]
    batch = create(client, containers.upload("input.jsonl", chat_file(2)), containers.output_url)
    assert wait_for(client, batch.id).status == "completed"

    headers, body = receiver.next()
    verifier = openai.OpenAI(api_key="unused", webhook_secret=secret)
    event = verifier.webhooks.unwrap(body, headers)
    assert event.type == "batch.completed"
    assert event.data.id == batch.id
    assert event.object == "event" and event.id.startswith("evt_")
    assert headers["user-agent"].startswith("OpenAI/1.0")

    # The same check refuses a changed byte, and another secret.
    forged = body.replace(batch.id.encode(), b"batch_someone_elses")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier.webhooks.unwrap(forged, headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="unused", webhook_secret="whsec_" + "QUJD" * 8).webhooks.unwrap(body, headers)


def test_a_refused_delivery_is_retried_with_the_same_webhook_id(start_emulator, containers):
    receiver = Receiver(statuses=[500, 503])
    try:
        emulator = start_emulator(step_ms=50)
        client = emulator.v1()
        secret = register(client, receiver.url, ["batch.failed", "batch.completed"])["signing_secret"]
        batch = create(client, containers.upload("input.jsonl", chat_file(1)), containers.output_url)
        wait_for(client, batch.id)

        attempts = [receiver.next(timeout=30) for _ in range(3)]
        ids = {h["webhook-id"] for h, _ in attempts}
        assert len(ids) == 1, "a retry is the same message"
        verifier = openai.OpenAI(api_key="unused", webhook_secret=secret)
        for headers, body in attempts:
            assert verifier.webhooks.unwrap(body, headers).data.id == batch.id
        with pytest.raises(queue.Empty):
            receiver.next(timeout=2)  # the 2xx ended the retries
    except queue.Empty:
        pytest.fail("the delivery was not retried")
    finally:
        receiver.stop()
