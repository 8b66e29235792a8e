"""The README's documented commands, parsed from the README, so it cannot drift from the code."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from app.main import create_app
from app.settings import Settings
from sae_core.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks() -> list[str]:
    return re.findall(r"```(?:bash|python)?\n(.*?)```", README, flags=re.S)


def setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_setup_is_two_make_targets_and_ci_runs_the_test_one():
    assert setup_commands() == ["make demo", "make test"]
    demo = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pip install -e ." in demo and "saescope demo" in demo
    test = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pytest" in test
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def documented_invocations() -> list[list[str]]:
    """Every `saescope COMMAND --flag ...` the README shows, in code blocks and in the table."""
    spans = re.findall(r"`(saescope [a-z][^`]*)`", README)
    lines = [line.strip() for block in code_blocks() for line in block.splitlines()]
    spans += [line.split("#")[0] for line in lines if line.startswith("saescope ")]
    return [span.replace("\\|", "|").split() for span in spans]


def test_every_documented_flag_exists():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    invocations = documented_invocations()
    assert len(invocations) >= 10
    for words in invocations:
        command = words[1]
        assert command in subparsers, f"README shows `saescope {command}`, which does not exist"
        options = {opt for action in subparsers[command]._actions for opt in action.option_strings}
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in options or flag.startswith("--no-") and "--" + flag[5:] in options, (
                f"README shows `saescope {command} {flag}`, which the parser does not accept"
            )


def documented_requests() -> list[tuple[str, str]]:
    requests = []
    for block in code_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip().startswith("curl"):
                continue
            words = shlex.split(line)
            method = words[words.index("-X") + 1] if "-X" in words else "GET"
            url = next(w for w in words if w.startswith("localhost:8000"))
            requests.append((method, url.removeprefix("localhost:8000").split("?")[0]))
    return requests


def test_every_curl_example_names_a_real_route():
    schema = create_app(Settings(db_url="sqlite:///unused.db", live=False)).openapi()
    routes = [
        (method.upper(), re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"))
        for path, operations in schema["paths"].items()
        for method in operations
    ]
    requests = documented_requests()
    assert len(requests) >= 8
    for method, path in requests:
        assert any(m == method and pattern.match(path) for m, pattern in routes), f"{method} {path} is not a route"
