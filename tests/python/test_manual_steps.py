"""Manual mode (`--step-ms 0`): a batch moves only when a test steps it through the test
control `POST /_emulator/step`, one documented status per step, and the control answers once
the step took effect; `POST /_emulator/expire` ends the completion window at a chosen step."""

from __future__ import annotations

import time

from support import chat_file, create, read_jsonl


def step(emulator, **query) -> list[dict]:
    status, body = emulator.control("step", **query)
    assert status == 200, body
    return body["data"]


def test_a_batch_stays_validating_until_stepped_then_moves_one_status_per_step(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "2", step_ms=0)
    client = emulator.azure()
    batch = create(client, containers.upload("input.jsonl", chat_file(5)), containers.output_url)
    assert batch.status == "validating"
    time.sleep(0.5)
    assert client.batches.retrieve(batch.id).status == "validating", "nothing moves by itself"

    # validating → in_progress → 2, 4, 5 requests answered (the last step finalizes) → completed
    expected = [
        ("in_progress", 0),
        ("in_progress", 2),
        ("in_progress", 4),
        ("finalizing", 5),
        ("completed", 5),
    ]
    for status, completed in expected:
        [stepped] = step(emulator, id=batch.id)
        assert stepped["id"] == batch.id
        assert (stepped["status"], stepped["request_counts"]["completed"]) == (status, completed)
        # The answer comes once the step took effect: the API says the same.
        seen = client.batches.retrieve(batch.id)
        assert (seen.status, seen.request_counts.completed) == (status, completed)
        assert seen.request_counts.total == 5

    [after] = step(emulator, id=batch.id, steps=3)
    assert after["status"] == "completed", "a finished batch stays as it is"
    done = client.batches.retrieve(batch.id)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert len(read_jsonl(containers.service, containers.account_url, done.output_blob)) == 5


def test_stepping_every_batch_and_several_steps_at_once(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "1", step_ms=0)
    client = emulator.v1()
    a = create(client, containers.upload("a.jsonl", chat_file(3, "a")), containers.output_url)
    b = create(client, containers.upload("b.jsonl", chat_file(3, "b")), containers.output_url)
    # Without an id: every active batch, oldest first, one step each.
    stepped = step(emulator)
    assert [s["id"] for s in stepped] == [a.id, b.id]
    assert [s["status"] for s in stepped] == ["in_progress", "in_progress"]
    [a_now] = step(emulator, id=a.id, steps=2)
    assert (a_now["status"], a_now["request_counts"]["completed"]) == ("in_progress", 2)
    assert client.batches.retrieve(b.id).request_counts.completed == 0


def test_expire_and_cancel_take_effect_at_the_next_step(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "2", step_ms=0)
    client = emulator.azure()
    late = create(client, containers.upload("late.jsonl", chat_file(6)), containers.output_url)
    step(emulator, id=late.id, steps=2)  # in_progress, 2 answered
    status, expired = emulator.control("expire", id=late.id)
    assert status == 200, expired
    assert expired["status"] == "expired"
    assert expired["request_counts"] == {"completed": 2, "failed": 4, "total": 6}
    errors = read_jsonl(containers.service, containers.account_url, expired["error_blob"])
    assert sorted(e["error"]["code"] for e in errors) == ["batch_expired"] * 4

    stopped = create(client, containers.upload("stop.jsonl", chat_file(4)), containers.output_url)
    step(emulator, id=stopped.id)
    assert client.batches.cancel(stopped.id).status == "cancelling"
    assert client.batches.retrieve(stopped.id).status == "cancelling", "until the next step"
    [cancelled] = step(emulator, id=stopped.id)
    assert cancelled["status"] == "cancelled"


def test_the_control_refuses_what_it_cannot_do(start_emulator, containers):
    manual = start_emulator(step_ms=0)
    status, body = manual.control("step", id="batch_nope")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = manual.control("step", steps="0")
    assert status == 400 and body["error"]["param"] == "steps"
    status, body = manual.control("expire")
    assert status == 400 and body["error"]["param"] == "id"
    timed = start_emulator()
    status, body = timed.control("step")
    assert status == 409 and body["error"]["code"] == "not_manual"
