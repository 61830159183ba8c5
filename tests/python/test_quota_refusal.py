"""`--quota-refusal failed-batch`: outside the fail-fast regions the service accepts a create
over the enqueued-token quota and fails the batch in validation, `token_limit_exceeded` in
`errors.data` (the batch how-to's "Queueing batch jobs", old behaviour), as the real `openai`
client sees it."""

from __future__ import annotations

from support import chat_file, create, wait_for


def test_over_the_quota_the_create_is_taken_and_the_batch_fails(start_emulator, containers):
    emulator = start_emulator(
        "--enqueued-token-limit", "1000", "--quota-refusal", "failed-batch", step_ms=0
    )
    client = emulator.azure()
    url = containers.upload("input.jsonl", chat_file(8))
    first = create(client, url, containers.output_url)
    second = create(client, url, containers.output_url)
    assert (first.status, second.status) == ("validating", "validating"), "both creates taken"

    # Validation: the first fits and holds the quota; the second does not.
    emulator.control("step")
    first, second = client.batches.retrieve(first.id), client.batches.retrieve(second.id)
    assert first.status == "in_progress"
    assert second.status == "failed" and second.failed_at is not None
    error = second.errors.data[0]
    assert (error.code, error.line, error.param) == ("token_limit_exceeded", None, None)
    assert "enqueued tokens has surpassed the configured limit of 1000" in error.message
    assert (second.output_blob, second.error_blob) == ("", ""), "a failed batch writes nothing"

    # Once the first has ended, the same file fits.
    emulator.control("step", id=first.id, steps=10)
    third = create(client, url, containers.output_url)
    emulator.control("step", id=third.id, steps=10)
    assert wait_for(client, third.id).status == "completed"
