#!/usr/bin/env bash
# scripts/smoke, tested: its --local mode as scripts/test runs it, the failure modes it must
# explain (nothing takes the files in; quota), and its Azure mode against a local stack through
# a stand-in `az` (tests/smoke/fake-az/az, which answers only the commands the script uses, as
# the Azure CLI's documentation describes them): a deployment that works, a login without a
# data role (403 on upload), and a function app with nothing published. Azure itself cannot be
# reached here; this is as close as it gets.
#
# Each case shows what scripts/smoke printed, indented, then `ok` or `FAIL`; the last line
# counts them. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROG=smoke-tests
# shellcheck source=scripts/lib/stack.sh
. scripts/lib/stack.sh
stack_init

passed=0 failed=0
# expect NAME RC PATTERN COMMAND...: runs COMMAND, wants exit status RC and a line matching
# PATTERN (grep -E) in its output.
expect() {
  local name=$1 want=$2 pattern=$3 rc=0 t=$SECONDS
  shift 3
  printf '\n--- %s\n    $ %s\n' "$name" "$*"
  "$@" >"$STACK_WORK/out" 2>&1 </dev/null || rc=$?
  sed 's/^/    | /' "$STACK_WORK/out"
  if [ "$rc" = "$want" ] && grep -qE -- "$pattern" "$STACK_WORK/out"; then
    echo "ok - $name (exit $rc, $((SECONDS - t)) s)"
    passed=$((passed + 1))
  else
    echo "FAIL - $name: exit $rc (want $want), /$pattern/ $(grep -qE -- "$pattern" "$STACK_WORK/out" && echo found || echo 'not found')"
    failed=$((failed + 1))
  fi
}

step "build (cargo, npm), once for every case"
stack_build >/dev/null 2>&1 || stack_build

step "scripts/smoke --local"
expect "local: the sample is answered" 0 '^smoke: passed' scripts/smoke --local
expect "local: nothing takes the files in (no local-host) → exit 1, says so" 1 'nothing took the files in within .*local-host was not started' \
  scripts/smoke --local --without-host --intake-timeout 5s
expect "local: the quota stays full → exit 1, says quota" 1 'did not complete: quota' \
  env SMOKE_EMULATOR_ARGS="--enqueued-token-limit 1" BATCH_QUEUE_MAX_ATTEMPTS=1 BATCH_QUEUE_INITIAL_DELAY_SECONDS=1 \
  scripts/smoke --local --timeout 90s

step "scripts/smoke RESOURCE_GROUP, through tests/smoke/fake-az against a local stack"
stack_start_azurite
stack_start_emulator gpt-4o-mini-batch
export FAKE_AZ_CS="$STACK_CS" FAKE_AZ_LOCAL_HOST="$STACK_BIN/local-host" FAKE_AZ_MODEL=gpt-4o-mini-batch
export FAKE_AZ_LOG="$STACK_WORK/az.log"
export SMOKE_POLL_SECS=1
AZ_PATH="$(pwd)/tests/smoke/fake-az:$PATH"

expect "azure: no data role on batch-input → exit 1, says 403 and userPrincipalId" 1 'refused \(403\).*userPrincipalId' \
  env PATH="$AZ_PATH" FAKE_AZ_DENY=upload scripts/smoke rg-smoke-test
expect "azure: nothing published → exit 1, says publish" 1 'lists no function-timer: the code is not published' \
  env PATH="$AZ_PATH" FAKE_AZ_NO_FUNCTIONS=1 scripts/smoke rg-smoke-test --intake-timeout 5s
expect "azure: wrong resource group → exit 1, names it" 1 'cannot read output storageAccountName of deployment aoai-batch in resource group rg-elsewhere' \
  env PATH="$AZ_PATH" scripts/smoke rg-elsewhere

stack_host --poll-ms 500 >"$STACK_WORK/host.log" 2>&1 &
stack_track $!
stack_wait_for_line "$!" "$STACK_WORK/host.log" 'handler ready' local-host >/dev/null
expect "azure: the deployment works → exit 0" 0 '^smoke: passed' \
  env PATH="$AZ_PATH" scripts/smoke rg-smoke-test --timeout 90s --intake-timeout 30s
if grep -E '^az storage' "$FAKE_AZ_LOG" | grep -vq -- '--auth-mode login'; then
  echo "FAIL - a storage command without --auth-mode login:"
  grep -E '^az storage' "$FAKE_AZ_LOG" | grep -v -- '--auth-mode login'
  failed=$((failed + 1))
fi

echo
echo "smoke: $passed passed, $failed failed"
[ "$failed" = 0 ]
