"""The service's input checks: each failure code fails the job (status `failed`, `failed_at`,
`errors.data[0]` with the code and the line where the service gives one) and writes nothing."""

from __future__ import annotations

import time

import openai
import pytest

from support import DEPLOYMENT, chat_file, chat_line, create, wait_for

BOM = b"\xef\xbb\xbf"


def lines(*items: str) -> bytes:
    return "".join(item + "\n" for item in items).encode()


def too_many() -> bytes:
    # Short lines keep the 100,001-line file near 9 MB.
    return "".join(
        f'{{"custom_id":"r{i}","method":"POST","url":"/chat/completions","body":{{"model":"{DEPLOYMENT}","messages":[{{"role":"user","content":"q"}}]}}}}\n'
        for i in range(100_001)
    ).encode()


CASES = {
    "invalid_json_line": (lambda: lines(chat_line("a"), "{not json", chat_line("c")), 2),
    "empty_file": (lambda: b"", None),
    "url_mismatch": (lambda: lines(chat_line("a"), chat_line("b", url="/responses")), 2),
    "model_mismatch": (lambda: lines(chat_line("a"), chat_line("b"), chat_line("c", model="other")), 3),
    "model_not_found": (lambda: lines(chat_line("a", model="not-deployed")), None),
    "duplicate_custom_id": (lambda: lines(chat_line("a"), chat_line("b"), chat_line("a")), 3),
    "invalid_request": (lambda: lines(chat_line("a"), chat_line("b", method="GET")), 2),
    "too_many_tasks": (too_many, None),
}


def run_to_failure(client, containers, data: bytes):
    url = containers.upload("input.jsonl", data)
    batch = create(client, url, containers.output_url)
    assert batch.status == "validating"
    batch = wait_for(client, batch.id)
    assert batch.status == "failed", batch
    assert batch.failed_at is not None
    assert batch.errors.object == "list"
    assert batch.output_blob == "" and batch.error_blob == ""
    assert containers.outputs() == [], "a failed job writes no file"
    return batch.errors.data[0]


@pytest.mark.parametrize("code", list(CASES))
def test_a_bad_input_fails_the_job(code, emulator, containers):
    make, line = CASES[code]
    error = run_to_failure(emulator.azure(), containers, make())
    assert error.code == code
    assert error.line == line
    assert error.message


def test_an_empty_file_fails_with_the_documented_message(emulator, containers):
    error = run_to_failure(emulator.azure(), containers, b"\n")
    assert error.code == "empty_file"
    assert error.message.startswith("The input file is empty.")


def test_a_utf8_bom_gives_the_misleading_deployment_message(emulator, containers):
    # Documented known issue: the message speaks of the deployment name, not of the BOM.
    error = run_to_failure(emulator.azure(), containers, BOM + chat_file(2))
    assert error.code == "model_not_found"
    assert error.message.startswith("A valid model deployment name couldn't be extracted from the input file")


def test_an_unknown_deployment_names_the_valid_ones(emulator, containers):
    error = run_to_failure(emulator.azure(), containers, chat_file(2, model="nope"))
    assert "'nope'" in error.message and f"'{DEPLOYMENT}'" in error.message


def test_a_missing_input_blob_is_input_no_permissions(emulator, containers):
    client = emulator.azure()
    missing = f"{containers.account_url}/{containers.input.container_name}/missing.jsonl"
    batch = wait_for(client, create(client, missing, containers.output_url).id)
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "input_no_permissions"
    assert batch.errors.data[0].line is None
    assert containers.outputs() == []


def test_a_blob_in_another_account_is_input_no_permissions(emulator, containers):
    client = emulator.azure()
    elsewhere = "https://someoneelse.blob.core.windows.net/batch-input/test.jsonl"
    batch = wait_for(client, create(client, elsewhere, containers.output_url).id)
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "input_no_permissions"
    assert batch.input_blob == elsewhere
    assert containers.outputs() == []


def test_changing_the_input_during_the_job_fails_it(start_emulator, containers):
    emulator = start_emulator("--lines-per-step", "1", step_ms=150)
    client = emulator.azure()
    url = containers.upload("input.jsonl", chat_file(8))
    batch = create(client, url, containers.output_url)
    wait_for(client, batch.id, until=lambda b: b.status == "in_progress" and b.request_counts.completed >= 1)
    containers.upload("input.jsonl", chat_file(8, prefix="changed"))
    batch = wait_for(client, batch.id)
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "input_modified"
    assert batch.errors.data[0].line is None
    assert containers.outputs() == [], "partial results of a failed job are not kept"


def test_an_input_changed_before_validation_ends_fails_too(start_emulator, containers):
    emulator = start_emulator(step_ms=600)
    client = emulator.azure()
    url = containers.upload("input.jsonl", chat_file(2))
    batch = create(client, url, containers.output_url)
    time.sleep(0.1)
    containers.upload("input.jsonl", chat_file(3))
    batch = wait_for(client, batch.id)
    assert (batch.status, batch.errors.data[0].code) == ("failed", "input_modified")


def test_token_limit_exceeded_is_a_400_at_create_and_frees_when_a_job_ends(start_emulator, containers):
    emulator = start_emulator("--enqueued-token-limit", "1000", "--lines-per-step", "1", step_ms=100)
    client = emulator.azure()
    url = containers.upload("input.jsonl", chat_file(8))
    first = client.batches.with_raw_response.create(
        input_file_id=None,
        endpoint="/chat/completions",
        completion_window="24h",
        extra_body={"input_blob": url, "output_folder": {"url": containers.output_url}},
    )
    enqueued = int(first.headers["deployment-enqueued-tokens"])
    assert int(first.headers["deployment-maximum-enqueued-tokens"]) == 1000
    assert enqueued <= 1000 < 2 * enqueued, "one file fits, two do not"
    first = first.parse()

    with pytest.raises(openai.BadRequestError) as raised:
        create(client, url, containers.output_url)
    assert raised.value.status_code == 400
    assert raised.value.code == "token_limit_exceeded"
    assert "enqueued tokens" in raised.value.message
    assert len(client.batches.list().data) == 1, "the refused create made no batch"

    assert wait_for(client, first.id).status == "completed"
    second = create(client, url, containers.output_url)
    assert wait_for(client, second.id).status == "completed"
