# shellcheck shell=bash
# The local stack that scripts/demo and scripts/smoke --local run (and tests/smoke/run.sh):
# Azurite (Blob Storage), the Azure OpenAI batch emulator (tools/aoai-batch-emulator) and
# local-host (tools/local-host), which plays the Azure Functions host for the real `handler`,
# each on a free loopback port. In Azure, the Functions host, Event Grid and Azure OpenAI do
# these parts.
#
# Sourced, not run. The caller has `set -euo pipefail`, runs from the repository root and may
# set PROG (its name, for messages) before sourcing. What it offers:
#
#   step TEXT                     a `==> TEXT  [m:ss]` header, with the time since the start
#   die TEXT                      `PROG: TEXT` on stderr, exit 1
#   stack_init                    a work folder ($STACK_WORK) and the trap that stops what was
#                                 started and removes it, on any exit
#   stack_build                   npm packages (Azurite) and the three binaries, showing cargo's
#                                 own progress; sets STACK_BIN
#   stack_start_azurite           sets STACK_CS (connection string) and STACK_BLOB_URL
#   stack_start_emulator NAME [ARG...]
#                                 the batch emulator with deployment NAME; sets STACK_OPENAI
#   stack_host [ARG...]           local-host with the handler's settings for this stack, in the
#                                 foreground (put it in the background with `&` and stack_track)
#   stack_track PID               stop PID too on exit
#   stack_blob upload|cat|ls ...  local-host's blob commands against this stack's storage
#   stack_report table SUMMARY MERGED
#                                 the answers as a table (scripts/lib/report.js)

PROG=${PROG:-$(basename "$0")}
STACK_T0=${STACK_T0:-$SECONDS}
STACK_PIDS=()
STACK_WORK=""
STACK_ROOT="$(pwd)"

# Azurite's documented development account key (public, not a secret).
STACK_ACCOUNT_KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

clock() { # m:ss since the script started
  local s=$((SECONDS - STACK_T0))
  printf '%d:%02d' $((s / 60)) $((s % 60))
}
step() { printf '\n==> %s  [%s]\n' "$*" "$(clock)"; }
die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 1
}

stack_cleanup() {
  local rc=$? pid
  for pid in "${STACK_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${STACK_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "$STACK_WORK" ] && rm -rf "$STACK_WORK"
  exit "$rc"
}

stack_init() {
  STACK_WORK="$(mktemp -d "${TMPDIR:-/tmp}/aoai-$PROG.XXXXXX")"
  trap stack_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

stack_track() { STACK_PIDS+=("$1"); }

# Waits until a background process prints a line matching a pattern to its log; prints the line.
stack_wait_for_line() {
  local pid=$1 log=$2 pattern=$3 what=$4 i
  for ((i = 0; i < 600; i++)); do
    if grep -m1 -E "$pattern" "$log" 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || {
      cat "$log" >&2
      die "$what exited during start-up (log above)"
    }
    sleep 0.1
  done
  cat "$log" >&2
  die "$what did not start within 60 s (log above)"
}

stack_build() {
  command -v cargo >/dev/null || die "cargo not found (install Rust with rustup: https://rustup.rs)"
  command -v npm >/dev/null || die "npm not found (install Node.js 20 or later)"
  command -v node >/dev/null || die "node not found (install Node.js 20 or later)"
  STACK_BIN=target/debug
  [ -n "${CARGO_TARGET_DIR:-}" ] && STACK_BIN="$CARGO_TARGET_DIR/debug"

  if [ ! -x node_modules/.bin/azurite-blob ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "npm ci: Azurite and its packages from package-lock.json (about a minute the first time)"
    npm ci --no-audit --no-fund --loglevel=error
  fi

  local first=""
  for b in handler aoai-batch-emulator local-host; do
    [ -x "$STACK_BIN/$b" ] || first=1
  done
  if [ -n "$first" ]; then
    echo "First run: cargo compiles the handler, the batch emulator and local-host with their"
    echo "dependencies (about 220 crates): about 9 minutes on 2 busy cores (measured), less on"
    echo "an idle machine. Later runs take seconds. Cargo's progress follows."
  else
    echo "cargo build: checks for changes (seconds when nothing changed)"
  fi
  local t=$SECONDS
  # Not --quiet: on a first run this is minutes of work, and cargo's own progress (a bar on a
  # terminal, a `Compiling …` line per crate in a log) is the only sign of it.
  cargo build --bins -p aoai-blob-batch -p aoai-batch-emulator -p local-host
  echo "built in $((SECONDS - t)) s"
}

stack_start_azurite() {
  # In its own folder: Azurite writes debug files to its working directory.
  (cd "$STACK_WORK" && exec "$STACK_ROOT/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort 0 \
    --inMemoryPersistence --disableTelemetry --skipApiVersionCheck --loose) >"$STACK_WORK/azurite.log" 2>&1 &
  stack_track $!
  local line port
  line="$(stack_wait_for_line "$!" "$STACK_WORK/azurite.log" 'successfully listens on' Azurite)"
  port="$(sed -E 's#.*http://127\.0\.0\.1:([0-9]+).*#\1#' <<<"$line")"
  STACK_BLOB_URL="http://127.0.0.1:$port/devstoreaccount1"
  STACK_CS="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=$STACK_ACCOUNT_KEY;BlobEndpoint=$STACK_BLOB_URL;"
  echo "Blob Storage at $STACK_BLOB_URL"
}

stack_start_emulator() { # DEPLOYMENT [EXTRA ARG...]
  local deployment=$1 line
  shift
  "$STACK_BIN/aoai-batch-emulator" --listen 127.0.0.1:0 --storage-connection-string "$STACK_CS" \
    --deployment "$deployment" --step-ms 500 "$@" >"$STACK_WORK/emulator.log" 2>&1 &
  stack_track $!
  line="$(stack_wait_for_line "$!" "$STACK_WORK/emulator.log" 'listening on http://' 'the batch emulator')"
  STACK_OPENAI="$(grep -oE 'http://127\.0\.0\.1:[0-9]+' <<<"$line" | head -1)"
  echo "Azure OpenAI (emulated) at $STACK_OPENAI, deployment $deployment"
}

# The Function App under local-host, with the handler's app settings all pointing at this
# local stack; anything the caller's shell has for a real Azure deployment is left out. The
# timer fires every 5 seconds instead of every 5 minutes. Start it in the background
# (`stack_host ... &`): it execs local-host, so `$!` is local-host itself, which the cleanup
# stops (and local-host its handler); without the exec, the cleanup killed only the subshell
# and left local-host and the handler running.
stack_host() {
  exec env -u AZURE_OPENAI_API_VERSION -u BATCH_STORAGE_ACCOUNT_URL -u AZURE_CLIENT_ID \
    -u BATCH_INPUT_CONTAINER -u BATCH_OUTPUT_CONTAINER -u BATCH_STATE_CONTAINER \
    AZURE_OPENAI_ENDPOINT="$STACK_OPENAI" \
    AZURE_OPENAI_API_KEY="local-key" \
    BATCH_STORAGE_CONNECTION_STRING="$STACK_CS" \
    BATCH_TIMER_SCHEDULE="*/5 * * * * *" \
    "$STACK_BIN/local-host" --app-root . --handler "$STACK_BIN/handler" "$@"
}

stack_blob() { # upload|cat|ls ARGS...: local-host's blob commands on this stack's storage
  local cmd=$1
  shift
  "$STACK_BIN/local-host" "$cmd" --storage-connection-string "$STACK_CS" "$@"
}

stack_report() { node "$STACK_ROOT/scripts/lib/report.js" "$@"; }
