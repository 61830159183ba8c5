"""Helpers shared by the tests: real processes (Azurite, the emulator), input lines, polling."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
import urllib.error
import urllib.request
from urllib.parse import urlencode, urlparse

import openai
from azure.storage.blob import BlobServiceClient

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_KEY = "test-api-key-0123456789"
API_VERSION = "2025-04-01-preview"
DEPLOYMENT = "gpt-4o-batch"
TERMINAL = ("completed", "failed", "expired", "cancelled")


class Service:
    """A child process whose merged output is collected; ready once a line matches `ready`."""

    def __init__(self, name: str, cmd: list[str], ready: str, timeout: float = 60) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        seen: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                self.lines.append(line)
                if os.environ.get("TEST_SHOW_LOGS"):
                    print(f"[{name}] {line}", flush=True)
                seen.put(line)
            seen.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = seen.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"{name} did not start in {timeout} s:\n" + self.log())
            if line is None:
                self.stop()
                raise RuntimeError(f"{name} exited before it was ready:\n" + self.log())
            match = re.search(ready, line)
            if match:
                self.port = int(match.group(1))
                return

    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Azurite(Service):
    def __init__(self) -> None:
        binary = ROOT / "node_modules" / ".bin" / "azurite-blob"
        if not binary.exists():
            raise RuntimeError(f"Azurite is not installed: run `npm ci` in {ROOT}")
        super().__init__(
            "azurite",
            [
                str(binary),
                "--blobHost", "127.0.0.1",
                "--blobPort", "0",
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--loose",
            ],
            r"successfully listens on http://127\.0\.0\.1:(\d+)",
        )
        self.account_url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.account_url};"
        )

    def service(self) -> BlobServiceClient:
        return BlobServiceClient.from_connection_string(self.connection_string)


def emulator_binary() -> str:
    return os.environ.get("EMULATOR_BIN", str(ROOT / "target" / "debug" / "aoai-batch-emulator"))


class Emulator(Service):
    def __init__(self, azurite: Azurite, args: list[str]) -> None:
        binary = emulator_binary()
        if not Path(binary).exists():
            raise RuntimeError(f"{binary} is missing: run `cargo build -p aoai-batch-emulator`")
        super().__init__(
            "emulator",
            [
                binary,
                "--listen", "127.0.0.1:0",
                "--storage-connection-string", azurite.connection_string,
                *args,
            ],
            r"aoai-batch-emulator listening on http://127\.0\.0\.1:(\d+)",
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def azure(self, **options) -> openai.AzureOpenAI:
        """The classic style, as the seed builds it (an API key instead of an Entra token)."""
        return openai.AzureOpenAI(
            api_key=API_KEY, azure_endpoint=self.endpoint, api_version=API_VERSION, **options
        )

    def v1(self, **options) -> openai.OpenAI:
        """The `/openai/v1/` style: the plain OpenAI client pointed at the resource."""
        return openai.OpenAI(base_url=f"{self.endpoint}/openai/v1/", api_key=API_KEY, **options)

    def control(self, what: str, **query) -> tuple[int, dict]:
        """POSTs to the test control `/_emulator/{what}` (step, expire); (status, body)."""
        url = f"{self.endpoint}/_emulator/{what}"
        if query:
            url += "?" + urlencode(query)
        request = urllib.request.Request(url, data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def chat_line(
    custom_id: str,
    question: str = "What is Altair Basic?",
    *,
    model: str = DEPLOYMENT,
    url: str = "/chat/completions",
    method: str = "POST",
) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": method,
            "url": url,
            "body": {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are an AI assistant that helps people find information."},
                    {"role": "user", "content": question},
                ],
            },
        }
    )


def chat_file(n: int, prefix: str = "task", **line_options) -> bytes:
    return "".join(
        chat_line(f"{prefix}-{i}", f"question number {i}", **line_options) + "\n" for i in range(n)
    ).encode()


def create(client, input_url: str, output_url: str, endpoint: str = "/chat/completions", **extra):
    """The seed's create call."""
    body = {"input_blob": input_url, "output_folder": {"url": output_url}}
    body.update(extra)
    return client.batches.create(
        input_file_id=None, endpoint=endpoint, completion_window="24h", extra_body=body
    )


def wait_for(client, batch_id: str, until=lambda b: b.status in TERMINAL, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout} s")
        time.sleep(0.05)


def blob_of(account_url: str, url: str) -> tuple[str, str]:
    """(container, name) of a blob URL in the Azurite account."""
    assert url.startswith(account_url + "/"), url
    path = urlparse(url).path.split("/", 3)  # '', account, container, name
    return path[2], path[3]


def read_jsonl(service: BlobServiceClient, account_url: str, url: str) -> list[dict]:
    container, name = blob_of(account_url, url)
    data = service.get_blob_client(container, name).download_blob().readall()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def exists(service: BlobServiceClient, account_url: str, url: str) -> bool:
    container, name = blob_of(account_url, url)
    return service.get_blob_client(container, name).exists()


@contextlib.contextmanager
def deadline(seconds: int):
    """Bounds code we run verbatim (the seed's polling loop) without editing it."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
