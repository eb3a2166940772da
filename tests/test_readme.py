"""The documentation's command lines parse: every ``creditgraph ...`` line of a code block in
README.md and docs/data.md names a command that exists, options it has and values of the right
type (parsed by the CLI's own click command, never run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from creditgraph.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "data.md"]
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each ``creditgraph`` command in the fenced code blocks of a
    Markdown file: continuation lines joined, comments and leading ``VAR=value`` dropped."""
    out: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        text = pending + " " + line.strip() if pending else line.strip()
        start = start if pending else number
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        words = shlex.split(text, comments=True)
        while words and _ENV.match(words[0]):
            words = words[1:]
        if words and words[0] == "creditgraph":
            out.append((start, shlex.join(words)))
    return out


def parse(args: list[str]):
    """The leaf click context of ``creditgraph ARGS`` (raises click's usage errors)."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("creditgraph", list(args))
    while hasattr(ctx.command, "resolve_command"):  # a group: descend into its subcommand
        rest = [*ctx._protected_args, *ctx.args]
        assert rest, f"`creditgraph {shlex.join(args)}` names no command"
        name, sub, rest = ctx.command.resolve_command(ctx, rest)
        ctx = sub.make_context(name, rest, parent=ctx)
    return ctx


LINES = [(p.name, n, c) for p in DOCS for n, c in command_lines(p)]


def test_docs_have_command_lines():
    names = {shlex.split(c)[1] for _, _, c in LINES}
    # the newcomer's path: convert, validate, run, score, serve, and the persistent runtime
    assert {"convert", "validate", "run", "score", "serve", "up", "down"} <= names


@pytest.mark.parametrize(("doc", "line", "command"), LINES, ids=[f"{d}:{n}" for d, n, _ in LINES])
def test_documented_command_parses(doc, line, command):
    words = shlex.split(command)
    ctx = parse(words[1:])  # raises on an unknown command or option, or a value that won't parse
    assert ctx.command.callback is not None, f"{doc}:{line}: `{command}` is a group, not a command"
    given = {w.split("=", 1)[0] for w in words if w.startswith("--")}
    known = {o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts)}
    assert given <= known, f"{doc}:{line}: options {given - known} of `{command}`"


def test_parse_rejects_what_the_cli_rejects():
    from creditgraph.evaluate.run import ABLATIONS

    base = ["score", "--run", "r", "--data", "d", "--out", "o"]
    with pytest.raises(Exception, match="No such option"):
        parse([*base, "--grid", "0:5:1"])
    with pytest.raises(Exception, match="No such command"):
        parse(["no-such-command"])
    with pytest.raises(typer.BadParameter, match="valid number"):
        parse([*base, "--r-max", "two"])
    # ablation names are checked by the configuration, not by the parser: the docs' names exist
    for _, _, command in LINES:
        words = shlex.split(command)
        if "--ablations" in words:
            names = words[words.index("--ablations") + 1].split(",")
            assert set(names) <= set(ABLATIONS), names


def test_command_lines_joins_continuations(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text creditgraph run outside a block\n```bash\n"
        "TOKEN=x creditgraph serve --run r \\\n    --port 9000   # a comment\n"
        "./run demo\n```\n"
    )
    assert command_lines(doc) == [(3, "creditgraph serve --run r --port 9000")]
