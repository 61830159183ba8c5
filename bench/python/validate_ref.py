#!/usr/bin/env python3
"""The Python way: the handler's pre-submit rules written as one would in Python.

One `json.loads` per line, a set of `custom_id`s, one `url` and one `body.model` for the whole
file, `method` POST, at most 100,000 requests and 200 MiB, UTF-8 without BOM, blank lines only
at the end. It prints problems as `line N: code: message` and exits 1 when there is one, 0
otherwise, like `handler validate FILE`. scripts/bench times it against the handler.

usage: validate_ref.py FILE [--time]   (--time: print the validation's own seconds to stderr)
"""

import json
import sys
import time

SUPPORTED_URLS = ("/chat/completions", "/responses", "/v1/chat/completions", "/v1/responses")
MAX_LINES = 100_000
MAX_BYTES = 200 * 1024 * 1024
MAX_PROBLEMS = 100
BOM = b"\xef\xbb\xbf"


def validate(path):
    problems = []
    more = 0

    def push(line, code, message):
        nonlocal more
        if len(problems) < MAX_PROBLEMS:
            problems.append((line, code, message))
        else:
            more += 1

    seen = {}  # custom_id -> first line
    url = model = None
    requests = 0
    size = 0
    blank = None  # first line of a run of blank lines
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            size += len(raw)
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if n == 1 and line.startswith(BOM):
                push(1, "bom", "the file starts with a UTF-8 byte-order mark")
                line = line[3:]
            if not line.strip(b" \t\r"):
                if blank is None:
                    blank = n
                continue
            if blank is not None:
                push(blank, "empty_line", "blank line before a request")
                blank = None
            requests += 1
            if requests == MAX_LINES + 1:
                push(n, "too_many_tasks", f"more than {MAX_LINES} requests")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                push(n, "invalid_utf8", f"not valid UTF-8: {e}")
                continue
            try:
                req = json.loads(text)
            except ValueError as e:
                push(n, "invalid_json_line", f"not valid JSON: {e}")
                continue
            if not isinstance(req, dict):
                push(n, "invalid_json_line", "each line must be one JSON object")
                continue

            cid = req.get("custom_id")
            if cid is None:
                push(n, "missing_custom_id", "no custom_id")
            elif not isinstance(cid, str) or not cid:
                push(n, "invalid_custom_id", "custom_id must be a non-empty string")
            elif cid in seen:
                push(n, "duplicate_custom_id", f"custom_id {cid!r} already used on line {seen[cid]}")
            elif requests <= MAX_LINES:
                seen[cid] = n

            if req.get("method") != "POST":
                push(n, "invalid_method", "method must be \"POST\"")

            u = req.get("url")
            if not isinstance(u, str) or not u:
                push(n, "missing_url", "no url")
            elif u not in SUPPORTED_URLS:
                push(n, "unsupported_url", f"url {u!r} is not supported")
            elif url is None:
                url = (u, n)
            elif u != url[0]:
                push(n, "url_mismatch", f"url {u!r} differs from {url[0]!r} on line {url[1]}")

            body = req.get("body")
            if not isinstance(body, dict):
                push(n, "invalid_body", "body must be an object")
                continue
            m = body.get("model")
            if not isinstance(m, str) or not m.strip():
                push(n, "missing_model", "body.model must be a non-empty string")
            elif model is None:
                model = (m, n)
            elif m != model[0]:
                push(n, "model_mismatch", f"body.model {m!r} differs from {model[0]!r} on line {model[1]}")

    if requests == 0:
        push(None, "empty_file", "the file has no requests")
    if size > MAX_BYTES:
        push(None, "file_too_large", f"the file is {size} bytes; at most {MAX_BYTES}")
    return requests, size, url, model, problems, more


def main():
    args = [a for a in sys.argv[1:] if a != "--time"]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    start = time.perf_counter()
    requests, size, url, model, problems, more = validate(args[0])
    elapsed = time.perf_counter() - start
    for line, code, message in problems:
        print(f"{'line ' + str(line) if line else 'file'}: {code}: {message}")
    if more:
        print(f"... and {more} more problems")
    if "--time" in sys.argv[1:]:
        print(f"secs={elapsed:.6f}", file=sys.stderr)
    if problems:
        print(f"REJECTED: {len(problems) + more} problems ({requests} request lines, {size} bytes)")
        return 1
    print(f"OK: {requests} requests, url {url[0]}, model {model[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
