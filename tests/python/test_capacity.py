"""The emulator's capacity model (issue 15) as the real `openai` client sees it: the quota
headers on every create answer, in both API styles, with the tokens of the deployment's
unfinished batches; and `--tokens-per-second` pacing a batch by its tokens, shared among the
deployment's running batches (counted in manual steps, one second each)."""

from __future__ import annotations

import json

from support import DEPLOYMENT


def lines(n: int, prefix: str) -> bytes:
    """`n` requests of 200 emulator tokens each: "user" plus 396 characters of content is
    100 (a quarter of the characters), plus `max_tokens` 100."""
    out = []
    for i in range(n):
        content = (f"{prefix}-{i:03} " * 100)[:396]
        out.append(json.dumps({
            "custom_id": f"{prefix}-{i}", "method": "POST", "url": "/chat/completions",
            "body": {"model": DEPLOYMENT, "max_tokens": 100,
                     "messages": [{"role": "user", "content": content}]},
        }))
    return ("\n".join(out) + "\n").encode()


def raw_create(client, url: str, output_url: str):
    return client.batches.with_raw_response.create(
        input_file_id=None,
        endpoint="/chat/completions",
        completion_window="24h",
        extra_body={"input_blob": url, "output_folder": {"url": output_url}},
    )


def step(emulator, **query) -> list[dict]:
    status, body = emulator.control("step", **query)
    assert status == 200, body
    return body["data"]


def test_every_create_answer_carries_both_quota_headers_in_both_styles(start_emulator, containers):
    emulator = start_emulator(step_ms=0)
    classic, v1 = emulator.azure(), emulator.v1()
    first = raw_create(classic, containers.upload("a.jsonl", lines(3, "a")), containers.output_url)
    # The documented Default-tier quota when the emulator is given none.
    assert first.headers["deployment-maximum-enqueued-tokens"] == "200000000"
    assert first.headers["deployment-enqueued-tokens"] == "600"
    second = raw_create(v1, containers.upload("b.jsonl", lines(2, "b")), containers.output_url)
    assert second.headers["deployment-maximum-enqueued-tokens"] == "200000000"
    assert second.headers["deployment-enqueued-tokens"] == "1000", "a's 600 and b's 400"
    # The headers ride on a normal answer: the client still parses the batch.
    assert second.parse().status == "validating"

    # Once the first ends, only the second's tokens are enqueued.
    first_id = first.parse().id
    while step(emulator, id=first_id)[0]["status"] != "completed":
        pass
    third = raw_create(classic, containers.upload("c.jsonl", lines(1, "c")), containers.output_url)
    assert third.headers["deployment-enqueued-tokens"] == "600", "b's 400 and c's 200"


def test_tokens_per_second_paces_a_batch_and_running_batches_share_it(start_emulator, containers):
    # 400 tokens/s: 2 requests of 200 tokens per one-second step for a batch alone.
    emulator = start_emulator("--tokens-per-second", "400", step_ms=0)
    client = emulator.azure()
    alone = raw_create(client, containers.upload("alone.jsonl", lines(6, "x")), containers.output_url).parse()
    assert step(emulator, id=alone.id)[0]["status"] == "in_progress"
    seen = [step(emulator, id=alone.id)[0]["request_counts"]["completed"] for _ in range(3)]
    assert seen == [2, 4, 6]
    assert client.batches.retrieve(alone.id).status == "finalizing"

    # Two running batches share the rate: one request each per step.
    one = raw_create(client, containers.upload("one.jsonl", lines(6, "y")), containers.output_url).parse()
    two = raw_create(client, containers.upload("two.jsonl", lines(6, "z")), containers.output_url).parse()
    step(emulator, id=one.id)
    step(emulator, id=two.id)
    for expected in (1, 2, 3):
        step(emulator, id=one.id)
        step(emulator, id=two.id)
        counts = [client.batches.retrieve(b).request_counts.completed for b in (one.id, two.id)]
        assert counts == [expected, expected]
