#!/usr/bin/env python3
"""The Python way: the handler's pre-submit rules written as one would in Python.

One `json.loads` per line, a set of `custom_id`s, one `url` and one `body.model` for the whole
file, `method` POST, at most 100,000 requests and 200 MiB, UTF-8 without BOM, blank lines only
at the end. It prints problems as `line N: code: message` and exits 1 when there is one, 0
otherwise, like `handler validate FILE`. scripts/bench times it against the handler.

With `--tokens DIR` it also estimates each request's input tokens as the handler does (the
rule in src/validate/tokens.rs: OpenAI's cookbook count over the messages, with the model
family's tokenizer), using `tiktoken`, the tool a Python user would reach for. tiktoken
downloads its encodings on first use; DIR holds `o200k_base.tiktoken` and
`cl100k_base.tiktoken` instead (tiktoken-rs ships them), placed in a private tiktoken cache so
that tiktoken's own loader checks them against OpenAI's published hashes.

usage: validate_ref.py FILE [--time] [--tokens DIR]
  --time: print the validation's own seconds to stderr
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

SUPPORTED_URLS = ("/chat/completions", "/responses", "/v1/chat/completions", "/v1/responses")
MAX_LINES = 100_000
MAX_BYTES = 200 * 1024 * 1024
MAX_PROBLEMS = 100
BOM = b"\xef\xbb\xbf"

# The handler's token rule (src/validate/tokens.rs).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_LOW_DETAIL = 85
IMAGE_HIGH_DETAIL = 765
PROMPT_KEYS = ("messages", "input", "instructions", "prompt", "tools", "functions")
ID_KEYS = ("id", "call_id", "tool_call_id")
TEXT_PART_TYPES = ("text", "input_text", "output_text", "refusal", "")
ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def load_encodings(assets):
    """tiktoken's o200k_base and cl100k_base, from files in `assets` instead of the network."""
    import tiktoken

    def load(name):
        # Loaded on first use only, as the handler loads its tokenizers (each takes a while).
        cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
        key = hashlib.sha1(ENCODING_URL.format(name).encode()).hexdigest()
        shutil.copy(os.path.join(assets, name + ".tiktoken"), os.path.join(cache, key))
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
        try:
            return tiktoken.get_encoding(name)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    encodings = {}

    def for_deployment(name):
        # tiktoken maps model names to encodings by prefix; a deployment name that says no
        # family gets o200k_base, as the handler decides.
        try:
            encoding = tiktoken.encoding_name_for_model(name.lower())
        except KeyError:
            encoding = "o200k_base"
        if encoding != "cl100k_base":
            encoding = "o200k_base"
        if encoding not in encodings:
            encodings[encoding] = load(encoding)
        return encodings[encoding]

    return for_deployment


class Prompt:
    """What one request's prompt is made of: texts to tokenize and tokens already known."""

    def __init__(self):
        self.texts = []
        self.fixed = 0
        self.messages = 0

    def walk(self, v, kind):
        if isinstance(v, str):
            if kind == "chars":
                self.fixed += -(-len(v) // 4)
            else:
                self.texts.append(v)
        elif isinstance(v, bool) or v is None or isinstance(v, float):
            pass
        elif isinstance(v, int):
            if kind == "token_ids":
                self.fixed += 1
        elif isinstance(v, list):
            element = {
                "messages": "message",
                "content": "part",
                "input": "input_item",
                "input_item": "token_ids",
                "token_ids": "token_ids",
                "chars": "chars",
            }.get(kind, "text")
            for e in v:
                self.walk(e, element)
        elif kind in ("message", "input_item"):
            self.messages += 1
            self.fixed += TOKENS_PER_MESSAGE
            for k, e in v.items():
                if k == "content":
                    self.walk(e, "content")
                elif k == "name":
                    self.fixed += TOKENS_PER_NAME
                    self.walk(e, "text")
                elif k != "type" and k not in ID_KEYS:
                    self.walk(e, "text")
        elif kind == "part":
            self.part(v)
        elif kind == "chars":
            for e in v.values():
                self.walk(e, "chars")
        else:
            for k, e in v.items():
                if k != "type":
                    self.walk(e, "text")

    def part(self, v):
        aside = Prompt()
        kind, image, low = None, False, False
        for k, e in v.items():
            if k == "type":
                kind = e
            elif k == "text":
                aside.walk(e, "text")
            elif k == "image_url":
                image = True
                if isinstance(e, dict):
                    low |= any(dk == "detail" and de == "low" for dk, de in e.items())
            elif k == "detail":
                low |= e == "low"
            else:
                aside.walk(e, "chars")
        kind = kind if isinstance(kind, str) else ""
        if image or kind in ("image_url", "input_image"):
            self.fixed += (IMAGE_LOW_DETAIL if low else IMAGE_HIGH_DETAIL) + aside.fixed
        elif kind in TEXT_PART_TYPES:
            self.texts.extend(aside.texts)
            self.fixed += aside.fixed
        else:
            self.fixed += aside.fixed - (-sum(len(t) for t in aside.texts) // 4)

    def tokens(self, encoding):
        priming = REPLY_PRIMING if self.messages else 0
        return self.fixed + priming + sum(len(encoding.encode_ordinary(t)) for t in self.texts)


def validate(path, for_deployment=None):
    """`for_deployment`: the deployment name's tiktoken encoding, to estimate tokens; None not to."""
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
    tokens = 0
    encoding = None  # (deployment name, its encoding): the last body.model seen
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
            if for_deployment is not None:
                if isinstance(m, str) and (encoding is None or encoding[0] != m):
                    encoding = (m, for_deployment(m))
                elif encoding is None:
                    encoding = ("", for_deployment(""))
                prompt = Prompt()
                for key in PROMPT_KEYS:
                    if key in body:
                        prompt.walk(body[key], "messages" if key == "messages" else "input" if key == "input" else "text")
                tokens += prompt.tokens(encoding[1])
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
    return requests, size, url, model, problems, more, tokens, encoding and encoding[1].name


def main():
    args = [a for a in sys.argv[1:] if a != "--time"]
    assets = None
    if "--tokens" in args:
        i = args.index("--tokens")
        if i + 1 >= len(args):
            print("--tokens needs the directory of the .tiktoken files", file=sys.stderr)
            return 2
        assets = args[i + 1]
        del args[i : i + 2]
    if len(args) != 1:
        print("usage: validate_ref.py FILE [--time] [--tokens DIR]", file=sys.stderr)
        return 2
    start = time.perf_counter()
    # Loading the encodings is timed, as the handler's first count loads its tokenizer.
    for_deployment = load_encodings(assets) if assets else None
    requests, size, url, model, problems, more, tokens, encoding = validate(args[0], for_deployment)
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
    estimate = f", {tokens} estimated input tokens ({encoding})" if for_deployment else ""
    print(f"OK: {requests} requests, url {url[0]}, model {model[0]}{estimate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
