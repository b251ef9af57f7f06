"""`fedrad site pull` and the options every command that talks to a PACS shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

DicomWeb = Annotated[str, typer.Option(
    "--dicomweb", help="The PACS' DICOMweb root, e.g. https://pacs.hospital/dicom-web")]
Credentials = Annotated[Path | None, typer.Option(
    help="TOML file (mode 600) with username and password, or token, for the PACS")]
CaBundle = Annotated[Path | None, typer.Option(
    help="PEM file of the CA that signed the PACS' certificate (default: the system's)")]
StudyFilter = Annotated[list[str] | None, typer.Option(
    "--study-filter", help="QIDO-RS study filter KEYWORD=VALUE, e.g. ModalitiesInStudy=CR "
    "(repeatable)")]


@contextmanager
def progress_bar(what: str, *, silent: bool) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, fed `(done, total)`; nothing under --json."""
    if silent:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(f"[bold]{what}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def pull_command(
    dicomweb: DicomWeb,
    data: Annotated[Path, typer.Option(help="The site's data folder to bring up to date")],
    credentials: Credentials = None,
    ca_bundle: CaBundle = None,
    study_filter: StudyFilter = None,
    labels: Annotated[Path | None, typer.Option(
        help="labels.csv for the cohort, copied beside the pulled images")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Pull a training cohort from the PACS (QIDO-RS + WADO-RS); only new instances move."""
    from fedrad.pacs import PacsConnection, PacsError
    from fedrad.site_pull import parse_filters, pull

    try:
        connection = PacsConnection(dicomweb, credentials, ca_bundle)
        with progress_bar("pulling", silent=as_json) as advance:
            summary = pull(connection, data, filters=parse_filters(study_filter or []),
                           labels=labels, say=lambda line: typer.echo(line, err=as_json),
                           progress=advance)
    except PacsError as exc:
        typer.echo(f"site pull stopped: {exc} (instances already pulled are kept)", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(summary.as_dict()))
        return
    for failed in summary.failed:
        what = failed.get("instance") or failed.get("study")
        typer.echo(f"not pulled {what}: {failed['reason']}")
