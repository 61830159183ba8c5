"""The seed document's own Python code, run against the emulator and Azurite.

The code blocks below are the seed's (shared/reference/000_95eda4b7270ef250.txt), changed only
where it names the endpoint and the credentials: Azurite speaks plain HTTP, where token
credentials cannot be used, so the account key stands in for `DefaultAzureCredential`, and an
API key for the Entra token provider. The 60 s poll interval is shortened.
"""

from __future__ import annotations

import datetime
import json
import time

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from openai import AzureOpenAI, OpenAI

from support import ACCOUNT, ACCOUNT_KEY, API_KEY, DEPLOYMENT, ROOT, deadline, read_jsonl

# The batch object the seed prints after `create`, key for key and in this order.
SEED_KEYS = [
    "id", "completion_window", "created_at", "endpoint", "input_file_id", "object", "status",
    "cancelled_at", "cancelling_at", "completed_at", "error_file_id", "errors", "expired_at",
    "expires_at", "failed_at", "finalizing_at", "in_progress_at", "metadata", "output_file_id",
    "request_counts", "error_blob", "input_blob", "output_blob",
]
QUESTIONS = {
    "task-0": "When was Microsoft founded?",
    "task-1": "When was the first XBOX released?",
    "task-2": "What is Altair Basic?",
}


@pytest.fixture
def seed_input(azurite, blob_service):
    """The seed's `test.jsonl`, uploaded to `batch-input` with the deployment name filled in
    as the seed tells its reader to do."""
    for name in ("batch-input", "batch-output"):
        if not blob_service.get_container_client(name).exists():
            blob_service.create_container(name)
    text = (ROOT / "samples" / "test.jsonl").read_text()
    text = text.replace("REPLACE-WITH-MODEL-DEPLOYMENT-NAME", DEPLOYMENT)
    blob_service.get_blob_client("batch-input", "test.jsonl").upload_blob(text, overwrite=True)
    return azurite.account_url


def check_created(raw: dict, input_blob: str) -> None:
    assert list(raw) == SEED_KEYS
    assert raw["id"].startswith("batch_")
    assert raw["object"] == "batch"
    assert raw["status"] == "validating"
    assert raw["completion_window"] == "24h"
    assert raw["endpoint"] == "/chat/completions"
    assert raw["input_blob"] == input_blob
    assert raw["output_blob"] == "" and raw["error_blob"] == ""
    assert raw["expires_at"] == raw["created_at"] + 24 * 3600
    assert raw["request_counts"] == {"completed": 0, "failed": 0, "total": 0}
    for key in SEED_KEYS:
        if key.endswith("_at") and key not in ("created_at", "expires_at"):
            assert raw[key] is None, key
    for key in ("input_file_id", "output_file_id", "error_file_id", "errors", "metadata"):
        assert raw[key] is None, key


def check_results(batch, blob_service, account_url: str) -> None:
    assert batch.request_counts.total == 3
    assert batch.request_counts.completed == 3
    assert batch.request_counts.failed == 0
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    guid = batch.output_blob.split("/")[-2]
    assert batch.output_blob == f"{account_url}/batch-output/{guid}/results.jsonl"
    # Both URLs always, though no request failed and so errors.jsonl was not written.
    assert batch.error_blob == f"{account_url}/batch-output/{guid}/errors.jsonl"
    with pytest.raises(ResourceNotFoundError):
        blob_service.get_blob_client("batch-output", f"{guid}/errors.jsonl").download_blob()
    lines = read_jsonl(blob_service, account_url, batch.output_blob)
    assert [line["custom_id"] for line in lines] != list(QUESTIONS), "order differs from input"
    assert sorted(line["custom_id"] for line in lines) == list(QUESTIONS)
    for line in lines:
        assert list(line) == ["custom_id", "response", "error"]
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert body["model"] == DEPLOYMENT
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"] == "echo: " + QUESTIONS[line["custom_id"]]
        assert choice["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_the_seed_code_runs_in_the_classic_style(
    emulator, seed_input, blob_service, tmp_path, monkeypatch, capsys
):
    account_url = seed_input
    monkeypatch.chdir(tmp_path)

    # ---- the seed: "バッチ ジョブを作成する" ----
    client = AzureOpenAI(
        azure_endpoint=emulator.endpoint,  # seed: os.getenv("AZURE_OPENAI_ENDPOINT")
        api_key=API_KEY,  # seed: azure_ad_token_provider=token_provider
        api_version="2025-04-01-preview",
    )

    batch_response = client.batches.create(
        input_file_id=None,
        endpoint="/chat/completions",
        completion_window="24h",
        extra_body={
            "input_blob": f"{account_url}/batch-input/test.jsonl",
            "output_folder": {
                "url": f"{account_url}/batch-output",
            },
        },
    )

    # Save batch ID for later use
    batch_id = batch_response.id

    print(batch_response.model_dump_json(indent=2))
    # ---- end ----

    printed = json.loads(capsys.readouterr().out)
    assert printed["id"] == batch_id
    # The client's model adds `model` and `usage` (OpenAI fields, null here); the rest is the
    # seed's object. Key order on the wire is checked in test_the_created_object_is_the_documented_one.
    check_created({key: printed[key] for key in SEED_KEYS}, f"{account_url}/batch-input/test.jsonl")

    # ---- the seed: the polling loop (sleep shortened from 60 s) ----
    with deadline(30):
        status = "validating"
        while status not in ("completed", "failed", "canceled"):
            time.sleep(0.1)
            batch_response = client.batches.retrieve(batch_id)
            status = batch_response.status
            print(f"{datetime.datetime.now()} Batch Id: {batch_id}, Status: {status}")

        if batch_response.status == "failed":
            for error in batch_response.errors.data:
                print(f"Error code {error.code} Message {error.message}")
    # ---- end ----

    seen = [line.rsplit("Status: ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert seen[-1] == "completed"
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert [s for s in order if s in seen] == [s for s in dict.fromkeys(seen)], seen
    assert "in_progress" in seen
    check_results(batch_response, blob_service, account_url)

    # ---- the seed: download with azure-storage-blob ----
    guid = batch_response.output_blob.split("/")[-2]

    # Define storage account and container information
    storage_account_name = ACCOUNT  # seed: "docstest002"
    container_name = "batch-output"

    # Define the blob paths to download
    blob_paths = [
        f"{guid}/results.jsonl",
    ]

    credential = {"account_name": storage_account_name, "account_key": ACCOUNT_KEY}  # seed: DefaultAzureCredential()
    account_url = account_url  # seed: f"https://{storage_account_name}.blob.core.windows.net"
    blob_service_client = BlobServiceClient(account_url=account_url, credential=credential)
    container_client = blob_service_client.get_container_client(container_name)

    for blob_path in blob_paths:
        blob_client = container_client.get_blob_client(blob_path)

        file_name = blob_path.split("/")[-1]

        print(f"Downloading {file_name}...")
        with open(file_name, "wb") as file:
            download_stream = blob_client.download_blob()
            file.write(download_stream.readall())
        print(f"Downloaded {file_name} successfully!")
    # ---- end ----

    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == list(QUESTIONS)


def test_the_seed_code_runs_in_the_v1_style(emulator, seed_input, blob_service, capsys):
    account_url = seed_input
    client = OpenAI(base_url=f"{emulator.endpoint}/openai/v1/", api_key=API_KEY)

    batch_response = client.batches.create(
        input_file_id=None,
        endpoint="/chat/completions",
        completion_window="24h",
        extra_body={
            "input_blob": f"{account_url}/batch-input/test.jsonl",
            "output_folder": {
                "url": f"{account_url}/batch-output",
            },
        },
    )
    batch_id = batch_response.id
    assert batch_response.status == "validating"

    with deadline(30):
        status = "validating"
        while status not in ("completed", "failed", "canceled"):
            time.sleep(0.1)
            batch_response = client.batches.retrieve(batch_id)
            status = batch_response.status

    assert status == "completed"
    check_results(batch_response, blob_service, account_url)


def test_the_created_object_is_the_documented_one(emulator, seed_input):
    """The raw JSON of the create answer, field for field as the seed prints it."""
    client = emulator.azure()
    input_blob = f"{seed_input}/batch-input/test.jsonl"
    raw = client.batches.with_raw_response.create(
        input_file_id=None,
        endpoint="/chat/completions",
        completion_window="24h",
        extra_body={"input_blob": input_blob, "output_folder": {"url": f"{seed_input}/batch-output"}},
    )
    assert raw.http_response.status_code == 201
    check_created(raw.http_response.json(), input_blob)
    assert int(raw.http_response.headers["deployment-enqueued-tokens"]) > 0
