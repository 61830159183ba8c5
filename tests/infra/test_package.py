"""The deployable package, checked the way `func azure functionapp publish` would zip it.

Core Tools zip every file of the publish folder except .funcignore'd ones and, always,
`local.settings.json`, `.funcignore`, `.gitignore`, `project.lock.json` (and the `.git`, `.vscode`
folders); only the entry at `customHandler.description.defaultExecutablePath` gets an executable
mode (Azure/azure-functions-core-tools: FileSystemHelpers.GetLocalFiles, ZipHelper).

The package tests build dist/publish-style output with scripts/package (a release musl build:
minutes the first time, seconds when nothing changed), so they run only with PACKAGE_TEST=1
(`scripts/check-infra --package`). The .funcignore test is static and always runs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALWAYS_EXCLUDED = {"local.settings.json", ".funcignore", ".gitignore", "project.lock.json"}
EXCLUDED_DIRS = {".git", ".vscode"}

package_test = pytest.mark.skipif(
    os.environ.get("PACKAGE_TEST") != "1", reason="set PACKAGE_TEST=1 (scripts/check-infra --package) to build the package"
)


@pytest.fixture(scope="module")
def publish_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("publish") / "publish"
    result = subprocess.run(
        [str(REPO / "scripts" / "package"), "--out", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"scripts/package failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def zipped(root: Path) -> set[str]:
    """What Core Tools would put in the zip (no .funcignore in the publish folder)."""
    return {
        f
        for f in files_under(root)
        if Path(f).name not in ALWAYS_EXCLUDED and not (set(Path(f).parts[:-1]) & EXCLUDED_DIRS)
    }


def elf_program_header_types(path: Path) -> tuple[int, int, list[int]]:
    """(ELF class, machine, [p_type of each program header]) of a little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path.name} is not an ELF file"
    elf_class, endian = data[4], data[5]
    assert elf_class == 2 and endian == 1, "expected ELF64 little-endian"
    (machine,) = struct.unpack_from("<H", data, 0x12)
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return elf_class, machine, types


@package_test
def test_publish_folder_holds_exactly_the_app(publish_dir: Path) -> None:
    functions = sorted(p.parent.name for p in REPO.glob("*/function.json"))
    assert functions == ["function-timer", "function-trigger", "function-webhook"]
    expected = {"host.json", "handler", *(f"{name}/function.json" for name in functions)}
    assert zipped(publish_dir) == expected
    assert files_under(publish_dir) == expected | {"local.settings.json"}


@package_test
def test_host_json_is_the_project_one_and_names_the_binary(publish_dir: Path) -> None:
    host = json.loads((publish_dir / "host.json").read_text(encoding="utf-8"))
    assert host == json.loads((REPO / "host.json").read_text(encoding="utf-8"))
    assert host["version"] == "2.0"
    exe = host["customHandler"]["description"]["defaultExecutablePath"]
    assert exe == "handler" and (publish_dir / exe).is_file()
    # function-webhook's signature covers the exact body bytes: the host forwards its request
    # as it came (only HTTP-in/out functions are forwarded; the other two keep the envelope).
    assert host["customHandler"].get("enableForwardingHttpRequest") is True


@package_test
def test_function_folders_match_the_contract(publish_dir: Path) -> None:
    trigger = json.loads((publish_dir / "function-trigger" / "function.json").read_text(encoding="utf-8"))
    assert trigger["bindings"] == [{"name": "event", "type": "eventGridTrigger", "direction": "in"}]
    timer = json.loads((publish_dir / "function-timer" / "function.json").read_text(encoding="utf-8"))
    [binding] = timer["bindings"]
    assert binding["type"] == "timerTrigger" and binding["name"] == "timer" and binding["direction"] == "in"
    assert binding["schedule"] == "%BATCH_TIMER_SCHEDULE%"
    assert binding["useMonitor"] is True
    assert binding["runOnStartup"] is False
    webhook = json.loads((publish_dir / "function-webhook" / "function.json").read_text(encoding="utf-8"))
    http_in, http_out = webhook["bindings"]
    assert http_in == {
        "name": "req", "type": "httpTrigger", "direction": "in", "authLevel": "function", "methods": ["post"]
    }
    assert http_out == {"name": "res", "type": "http", "direction": "out"}


@package_test
def test_handler_is_a_static_x86_64_executable(publish_dir: Path) -> None:
    handler = publish_dir / "handler"
    assert stat.S_IMODE(handler.stat().st_mode) == 0o755
    elf_class, machine, types = elf_program_header_types(handler)
    assert machine == 0x3E, "not x86-64"
    PT_INTERP = 3
    assert PT_INTERP not in types, "dynamically linked: it would depend on the image's libc"
    # Stripped: no .symtab section name left in the file.
    assert b".symtab" not in handler.read_bytes()


@package_test
def test_handler_runs_and_validates_the_sample(publish_dir: Path) -> None:
    """The static binary starts on this machine; `handler validate FILE` is part of the Contract."""
    result = subprocess.run(
        [str(publish_dir / "handler"), "validate", str(REPO / "samples" / "test.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@package_test
def test_nothing_else_is_executable_or_secret(publish_dir: Path) -> None:
    for name in files_under(publish_dir) - {"handler"}:
        mode = stat.S_IMODE((publish_dir / name).stat().st_mode)
        assert not mode & 0o111, f"{name} is executable; Core Tools would drop that bit anyway"
        assert not name.endswith((".rs", ".toml", ".lock", ".md", ".example", ".env"))
    settings = json.loads((publish_dir / "local.settings.json").read_text(encoding="utf-8"))
    assert settings == {"IsEncrypted": False, "Values": {"FUNCTIONS_WORKER_RUNTIME": "custom"}}
    for name in files_under(publish_dir) - {"handler"}:
        text = (publish_dir / name).read_text(encoding="utf-8")
        for marker in ["AccountKey=", "SharedAccessSignature", "UseDevelopmentStorage", "api-key", "API_KEY"]:
            assert marker not in text, f"{name} contains {marker}"


# --- .funcignore (publishing from the repository root) -----------------------------------------


def funcignore_patterns() -> list[str]:
    lines = (REPO / ".funcignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_funcignore_keeps_sources_and_build_output_out() -> None:
    """From the root, only host.json, the function folders and a handler binary would be uploaded."""
    patterns = funcignore_patterns()
    allowed = {"host.json", "handler"} | {p.parent.name for p in REPO.glob("*/function.json")}
    # Everything in the project that git sees (tracked or not ignored), plus local build output.
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    entries = {line.split("/")[0] for line in listed.stdout.splitlines() if line} if listed.returncode == 0 else set(os.listdir(REPO))
    entries |= {"target", "dist", "node_modules", ".venv", ".venv-infra", "local.settings.json"}
    for entry in sorted(entries):
        if entry in ALWAYS_EXCLUDED or entry in EXCLUDED_DIRS:
            continue
        ignored = any(fnmatch.fnmatchcase(entry, pattern.rstrip("/")) for pattern in patterns)
        assert ignored or entry in allowed, f"publishing from the root would upload {entry!r}; add it to .funcignore"
    for must in ["local.settings.json", "target", "src", "tests", "tools", "infra", "scripts", "dist", "Cargo.*", "*.md"]:
        assert must in patterns, must
    for keep in allowed:
        assert not any(fnmatch.fnmatchcase(keep, p) for p in patterns), f".funcignore hides {keep}"


@package_test
def test_the_published_handler_ignores_the_test_switches(publish_dir: Path) -> None:
    """A stray BATCH_TEST_FAULT in the app settings must not abort the deployed app, nor
    BATCH_TEST_HOOKS open a route that moves its clock: the release build ignores both and
    says so at start-up."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    env = {
        "PATH": os.environ.get("PATH", ""),
        "FUNCTIONS_CUSTOMHANDLER_PORT": str(port),
        "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9",
        "AZURE_OPENAI_API_KEY": "k",
        "BATCH_STORAGE_CONNECTION_STRING": (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={key};BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
        ),
        "BATCH_TEST_FAULT": "submit:after-claim",
        "BATCH_TEST_HOOKS": "1",
    }
    proc = subprocess.Popen(
        [str(publish_dir / "handler")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, "the handler exited"
                assert time.monotonic() < deadline, "the handler did not answer GET /"
                time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/_test/clock?advance=60", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 404
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    logs = out + err
    assert "BATCH_TEST_FAULT is for tests of a debug build; this release build ignores it" in logs, logs
    assert "BATCH_TEST_HOOKS is for tests of a debug build" in logs, logs
