"""How every reporting command speaks: human text, or with --json one JSON object on
stdout and the human text on stderr (so a script reads stdout and a person still sees
progress)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout "
                                                     "(human text goes to stderr)")]


class Output:
    """One command's output, human or JSON."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def say(self, line: str) -> None:
        """A human line: stdout, or stderr under --json."""
        typer.echo(line, err=self.as_json)

    def result(self, data: dict[str, Any], line: str) -> None:
        """The command's outcome: `line` for a person, `data` as JSON under --json."""
        if self.as_json:
            typer.echo(json.dumps(data, sort_keys=True))
        else:
            typer.echo(line)
