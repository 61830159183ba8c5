"""Running jobs: partial results on cancel and expiry, failed requests in `errors.jsonl`,
the Responses API, and the progress counters."""

from __future__ import annotations

import json

import openai
import pytest

from support import DEPLOYMENT, chat_file, create, exists, read_jsonl, wait_for


def outputs_of(batch, containers):
    results = read_jsonl(containers.service, containers.account_url, batch.output_blob)
    has_errors = exists(containers.service, containers.account_url, batch.error_blob)
    errors = read_jsonl(containers.service, containers.account_url, batch.error_blob) if has_errors else None
    return results, errors


def test_cancel_keeps_the_partial_results(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "1", step_ms=100)
    client = emulator.azure()
    batch = create(client, containers.upload("input.jsonl", chat_file(10)), containers.output_url)
    wait_for(client, batch.id, until=lambda b: b.request_counts.completed >= 2)

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    batch = wait_for(client, batch.id)

    assert batch.status == "cancelled"
    assert batch.cancelled_at is not None and batch.completed_at is None
    done = batch.request_counts.completed
    assert 2 <= done < 10 and batch.request_counts.total == 10
    results, errors = outputs_of(batch, containers)
    assert len(results) == done, "what was answered before the cancel is kept"
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert errors is None, "nothing failed, so errors.jsonl is not written"
    assert batch.error_blob.endswith("/errors.jsonl")

    with pytest.raises(openai.BadRequestError) as raised:
        client.batches.cancel(batch.id)
    assert "cancelled" in raised.value.message


def test_cancel_while_validating_ends_with_no_answers(start_emulator, containers):
    emulator = start_emulator(step_ms=300)
    client = emulator.v1()
    batch = create(client, containers.upload("input.jsonl", chat_file(3)), containers.output_url)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait_for(client, batch.id)
    assert batch.status == "cancelled"
    assert batch.in_progress_at is None
    results, errors = outputs_of(batch, containers)
    assert results == [] and errors is None


def test_expiry_keeps_the_partial_results_and_reports_the_rest(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "1", "--expire-after-ms", "700", step_ms=100)
    client = emulator.azure()
    batch = create(client, containers.upload("input.jsonl", chat_file(20)), containers.output_url)
    assert batch.expires_at == batch.created_at + 1, "expires_at follows --expire-after-ms"
    batch = wait_for(client, batch.id)

    assert batch.status == "expired"
    assert batch.expired_at is not None
    done, failed = batch.request_counts.completed, batch.request_counts.failed
    assert 0 < done < 20 and done + failed == 20
    results, errors = outputs_of(batch, containers)
    assert len(results) == done
    # OpenAI documents the requests the window ran out on as `batch_expired` error lines.
    assert len(errors) == failed
    for line in errors:
        assert line["response"] is None
        assert line["error"]["code"] == "batch_expired"
    ids = {line["custom_id"] for line in results + errors}
    assert ids == {f"task-{i}" for i in range(20)}


def failed_ids(emulator, containers, name: str):
    client = emulator.azure()
    batch = create(client, containers.upload(name, chat_file(20)), containers.output_url)
    batch = wait_for(client, batch.id)
    assert batch.status == "completed"
    results, errors = outputs_of(batch, containers)
    assert errors is not None, "some lines failed, so errors.jsonl exists"
    assert batch.request_counts.failed == len(errors) > 0
    assert batch.request_counts.completed == len(results) > 0
    for line in errors:
        assert line["error"] is None
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["code"] == "server_error"
    ids = [line["custom_id"] for line in results + errors]
    assert sorted(ids) == sorted(f"task-{i}" for i in range(20)), "every request answered once"
    return {line["custom_id"] for line in errors}


def test_injected_line_failures_go_to_errors_jsonl_deterministically(start_emulator, containers):
    first = failed_ids(start_emulator("--line-failure-rate", "0.5", "--seed", "7"), containers, "a.jsonl")
    again = failed_ids(start_emulator("--line-failure-rate", "0.5", "--seed", "7"), containers, "b.jsonl")
    assert first == again


def test_a_request_without_messages_gets_a_400_line(emulator, containers):
    good = json.loads(chat_file(1).decode())
    bad = {**good, "custom_id": "no-messages", "body": {"model": DEPLOYMENT}}
    data = (json.dumps(good) + "\n" + json.dumps(bad) + "\n").encode()
    client = emulator.azure()
    batch = wait_for(client, create(client, containers.upload("input.jsonl", data), containers.output_url).id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    _, errors = outputs_of(batch, containers)
    assert errors[0]["custom_id"] == "no-messages"
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "messages"


def test_the_responses_api_gets_response_objects(emulator, containers):
    data = "".join(
        json.dumps({"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses",
                    "body": {"model": DEPLOYMENT, "input": f"What is {i}?"}}) + "\n"
        for i in range(3)
    ).encode()
    client = emulator.v1()
    batch = create(client, containers.upload("input.jsonl", data), containers.output_url, endpoint="/v1/responses")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.endpoint == "/v1/responses"
    results, errors = outputs_of(batch, containers)
    assert errors is None
    for line in results:
        body = line["response"]["body"]
        assert body["object"] == "response" and body["status"] == "completed"
        message = body["output"][0]
        assert (message["type"], message["role"]) == ("message", "assistant")
        n = line["custom_id"].split("-")[1]
        assert message["content"][0] == {"type": "output_text", "text": f"echo: What is {n}?", "annotations": []}
        usage = body["usage"]
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_counts_progress_during_in_progress_and_outputs_go_to_a_subfolder(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "2", step_ms=100)
    client = emulator.azure()
    folder = f"{containers.output_url}/runs/today"
    batch = create(client, containers.upload("input.jsonl", chat_file(6)), folder)
    statuses, counts = [], []
    while batch.status not in ("completed", "failed"):
        batch = client.batches.retrieve(batch.id)
        statuses.append(batch.status)
        if batch.status == "in_progress":
            counts.append(batch.request_counts.completed)
    assert "in_progress" in statuses and "finalizing" in statuses
    assert batch.status == "completed"
    assert any(0 < c < 6 for c in counts), f"progress visible while running: {counts}"
    assert counts == sorted(counts)
    assert batch.output_blob.startswith(f"{folder}/")
    assert containers.outputs() == [batch.output_blob.split(f"{containers.output.container_name}/", 1)[1]]
