#!/usr/bin/env python3
"""A stand-in custom handler for local-host's tests: records every request it gets.

Listens on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT, answers GET / for the readiness probe and
every POST with the host's JSON answer. Settings (environment):
  FAKE_RECORD      file to append one JSON line per POST to (path, headers, body, start, end)
  FAKE_FAIL_FIRST  answer the first N POSTs to function-trigger with HTTP 500
  FAKE_TIMER_SLEEP seconds each function-timer invocation takes
  FAKE_TRIGGER_SLEEP seconds each function-trigger invocation takes
  FAKE_EXIT_AT_ONCE exit with status 3 before listening
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if os.environ.get("FAKE_EXIT_AT_ONCE"):
    print("fake handler: missing setting FAKE_SOMETHING", file=sys.stderr, flush=True)
    sys.exit(3)

RECORD = os.environ["FAKE_RECORD"]
FAIL_FIRST = int(os.environ.get("FAKE_FAIL_FIRST", "0"))
TIMER_SLEEP = float(os.environ.get("FAKE_TIMER_SLEEP", "0"))
TRIGGER_SLEEP = float(os.environ.get("FAKE_TRIGGER_SLEEP", "0"))
lock = threading.Lock()
trigger_calls = 0


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(404)
        self.end_headers()

    def do_POST(self):
        global trigger_calls
        start = time.time()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        function = self.path.lstrip("/")
        status = 200
        if function == "function-trigger":
            with lock:
                trigger_calls += 1
                if trigger_calls <= FAIL_FIRST:
                    status = 500
        if function == "function-timer":
            time.sleep(TIMER_SLEEP)
        if function == "function-trigger":
            time.sleep(TRIGGER_SLEEP)
        print(f"fake handler: {function} -> {status}", flush=True)
        with lock, open(RECORD, "a") as f:
            f.write(json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                "status": status, "start": start, "end": time.time()}) + "\n")
        answer = json.dumps({"Outputs": {}, "Logs": [f"fake saw {function}"], "ReturnValue": None})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(answer.encode())


with open(os.environ.get("FAKE_PIDFILE", os.devnull), "w") as f:
    f.write(str(os.getpid()))
port = int(os.environ["FUNCTIONS_CUSTOMHANDLER_PORT"])
print(f"fake handler listening on {port}", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
