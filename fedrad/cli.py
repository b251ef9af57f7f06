"""The `fedrad` command: one entry point for hospital IT, coordinators and researchers.

Commands call library functions; heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from fedrad.cli_output import AsJson, Output
from fedrad.cli_pacs import CaBundle, Credentials, StudyFilter, progress_bar, pull_command
from fedrad.cli_pretrain import pretrain_command
from fedrad.cli_runs import (
    evaluate_command,
    models_app,
    predict_command,
    report_command,
    run_app,
)

app = typer.Typer(help="fedrad: federated learning across hospitals.", no_args_is_help=True)
site_app = typer.Typer(help="Commands for hospital IT running a site.", no_args_is_help=True)
app.add_typer(site_app, name="site")
consortium_app = typer.Typer(help="Provision a consortium: CA, keys, startup kits.",
                             no_args_is_help=True)
app.add_typer(consortium_app, name="consortium")
app.add_typer(run_app, name="run")
app.add_typer(models_app, name="models")
app.command("evaluate")(evaluate_command)
app.command("predict")(predict_command)
app.command("report")(report_command)
app.command("pretrain")(pretrain_command)
site_app.command("pull")(pull_command)


@consortium_app.command("init")
def consortium_init(
    name: Annotated[str, typer.Argument(help="The consortium's name")],
    folder: Annotated[Path, typer.Option(help="New consortium folder")] = Path("consortium"),
    host: Annotated[list[str] | None, typer.Option(
        help="SuperLink host name or IP for its certificate (repeatable; the first is the "
        "address in every kit)")] = None,
    port: Annotated[int, typer.Option(help="SuperLink port the sites connect to")] = 9092,
    as_json: AsJson = False,
) -> None:
    """A CA, the SuperLink's TLS certificate and the signing key (Ed25519)."""
    from common.pki import ProvisioningError
    from fedrad.consortium import init_consortium

    try:
        init_consortium(folder, name, host or ["127.0.0.1", "localhost"], port)
    except ProvisioningError as exc:
        raise typer.BadParameter(str(exc), param_hint="--folder") from exc
    Output(as_json).result(
        {"consortium": name, "folder": str(folder.resolve())},
        f"consortium {name!r} in {folder}: ca.crt, server.pem/.key, signing.key/.pub "
        "(models, for the server), code-signing.key/.pub (apps; keep it offline)")


@consortium_app.command("add-site")
def consortium_add_site(
    site: Annotated[str, typer.Argument(help="Site name: a-z, 0-9, '-', '_'")],
    folder: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    passphrase_file: Annotated[Path | None, typer.Option(
        help="Seal the kit with the passphrase in this file (first line, 12+ characters): "
        "kits/<site>.kit instead of kits/<site>.tar.gz")] = None,
    as_json: AsJson = False,
) -> None:
    """The site's node key pair and its startup kit (mode 0600)."""
    from common.pki import ProvisioningError
    from fedrad.consortium import add_site, load_consortium, startup_kit
    from fedrad.kit import check_passphrase
    from fedrad.site_node import read_passphrase

    try:
        consortium = load_consortium(folder)
        passphrase = None  # checked before any key is made: a refused kit leaves nothing
        if passphrase_file is not None:
            passphrase = check_passphrase(read_passphrase(passphrase_file) or "")
        add_site(consortium, site)
        kit = startup_kit(consortium, site, passphrase)
    except ProvisioningError as exc:
        raise typer.BadParameter(str(exc), param_hint="SITE") from exc
    Output(as_json).result({"site": site, "kit": str(kit.resolve())},
                           f"startup kit for {site}: {kit}")


@consortium_app.command("reissue-kit")
def consortium_reissue_kit(
    site: Annotated[str, typer.Argument(help="A provisioned site")],
    folder: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    passphrase_file: Annotated[Path | None, typer.Option(
        help="Seal the kit with the passphrase in this file (first line, 12+ characters)")]
    = None,
    as_json: AsJson = False,
) -> None:
    """A new startup kit for a provisioned site, same node key (the pins of the apps
    signed since, a site certificate for a kit made before there were any); the old kit
    is kept as kits/<site>.<time>.old-kit."""
    from common.pki import ProvisioningError
    from fedrad.consortium import load_consortium, startup_kit
    from fedrad.kit import check_passphrase
    from fedrad.site_node import read_passphrase

    try:
        consortium = load_consortium(folder)
        passphrase = None
        if passphrase_file is not None:
            passphrase = check_passphrase(read_passphrase(passphrase_file) or "")
        kit = startup_kit(consortium, site, passphrase, reissue=True)
    except ProvisioningError as exc:
        raise typer.BadParameter(str(exc), param_hint="SITE") from exc
    Output(as_json).result({"site": site, "kit": str(kit.resolve()), "reissued": True},
                           f"new startup kit for {site}: {kit}")


@consortium_app.command("export-server")
def consortium_export_server(
    out: Annotated[Path, typer.Option(help="New folder for the server's copy")],
    folder: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    as_json: AsJson = False,
) -> None:
    """What the server host needs, without the CA's private key or any site's private key:
    certificates, the server's TLS key, the signing key, sites' public keys, signed apps."""
    from common.pki import ProvisioningError
    from fedrad.consortium import export_server, load_consortium

    try:
        copied = export_server(load_consortium(folder), out)
    except ProvisioningError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from exc
    Output(as_json).result({"folder": str(out.resolve()), "files": len(copied)},
                           f"server copy in {out}: {len(copied)} files (no ca.key, no site "
                           "private keys)")


@consortium_app.command("sign-app")
def consortium_sign_app(
    folder: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    app_dir: Annotated[Path | None, typer.Option(
        "--app", help="The Flower app to sign (default: the installed fedrad app)")] = None,
    as_json: AsJson = False,
) -> None:
    """Build the ClientApp/ServerApp bundle (FAB) and sign it with the consortium's key.

    Sites run only signed code (SuperNode --trusted-entities); `fedrad server start`
    serves the signed FABs; submit with `flwr run @fedrad/fedrad==VERSION`.
    """
    from common.pki import ProvisioningError
    from fedrad.app_registry import sign_app
    from fedrad.consortium import load_consortium
    from fedrad.demo import APP_DIR

    try:
        signed = sign_app(load_consortium(folder).folder, app_dir or APP_DIR)
    except ProvisioningError as exc:
        raise typer.BadParameter(str(exc), param_hint="--folder/--app") from exc
    Output(as_json).result({"app": signed.spec(), "sha256": signed.sha256},
                           f"signed {signed.spec()} (sha256 {signed.sha256}); submit runs "
                           f"with `flwr run {signed.spec()}`")


@consortium_app.command("remove-site")
def consortium_remove_site(
    site: Annotated[str, typer.Argument(help="Site to revoke")],
    folder: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    as_json: AsJson = False,
) -> None:
    """Revoke a site's key (then `flwr supernode unregister` it on a running SuperLink)."""
    from common.pki import ProvisioningError
    from fedrad.consortium import load_consortium, remove_site

    try:
        listing = remove_site(load_consortium(folder), site)
    except ProvisioningError as exc:
        raise typer.BadParameter(str(exc), param_hint="SITE") from exc
    Output(as_json).result({"site": site, "revoked": True, "listing": str(listing)},
                           f"{site} revoked; see {listing}")


server_app = typer.Typer(help="The consortium's server side.", no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    consortium: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink port (sites and coordinators)")] = 9092,
    state_dir: Annotated[Path | None, typer.Option(
        help="Server state: SuperLink database, runs, audit log (default: "
        "<consortium>/server)")] = None,
) -> None:
    """SuperLink (TLS, node authentication, state database kept across restarts) and the
    consortium's signed-app registry; registers provisioned sites; runs until stopped."""
    from common.pki import ProvisioningError
    from fedrad.processes import DeploymentError
    from fedrad.server_node import start_server

    try:
        code = start_server(consortium, host=host, port=port, say=typer.echo, state=state_dir)
    except (ProvisioningError, DeploymentError) as exc:
        typer.echo(f"server did not start: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


@server_app.command("dashboard")
def server_dashboard(
    consortium: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    state_dir: Annotated[Path | None, typer.Option(
        help="The server's --state-dir, if it was given one")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1")] = 8080,
) -> None:
    """A read-only status page on 127.0.0.1: runs, rounds, sites online, metric plots,
    privacy spent per site."""
    from fedrad.dashboard import serve
    from fedrad.server_node import ServerHome

    home = ServerHome(consortium.resolve(), state_dir.resolve() if state_dir else None)
    try:
        server = serve(home, port)
    except OSError as exc:
        typer.echo(f"dashboard did not start on 127.0.0.1:{port}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"dashboard on http://127.0.0.1:{server.server_address[1]}/ (read-only)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@server_app.command("sync-sites")
def server_sync_sites(
    consortium: Annotated[Path, typer.Option(help="The consortium folder")] = Path("consortium"),
    state_dir: Annotated[Path | None, typer.Option(
        help="The server's --state-dir, if it was given one")] = None,
    as_json: AsJson = False,
) -> None:
    """On a running server: register new sites' keys, unregister revoked ones."""
    from fedrad.consortium import load_consortium
    from fedrad.processes import DeploymentError
    from fedrad.server_node import ServerHome, sync_sites

    loaded = load_consortium(consortium)
    home = ServerHome(loaded.folder, state_dir)
    if not home.ready.exists():
        typer.echo(f"no running server for {consortium} (start it: fedrad server start)",
                   err=True)
        raise typer.Exit(1)
    try:
        nodes = sync_sites(loaded, home)
    except DeploymentError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    Output(as_json).result({"sites": nodes}, "\n".join(
        f"{site}: node {record['node_id']} {record['status']}"
        for site, record in sorted(nodes.items())))


audit_app = typer.Typer(help="Audit logs (hash-chained, append-only).", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    path: Annotated[Path, typer.Argument(help="An audit log (audit.jsonl)")],
    as_json: AsJson = False,
) -> None:
    """Check every entry's hash and link; exit 1 naming the first altered line."""
    from common.audit import AuditError, verify

    try:
        head = verify(path)
    except AuditError as exc:
        Output(as_json).result({"file": str(path), "intact": False, "error": str(exc)},
                               f"audit log altered: {exc}")
        raise typer.Exit(1) from exc
    Output(as_json).result({"file": str(path), "entries": head.entries, "intact": True,
                            "last_hash": head.last_hash},
                           f"{path}: {head.entries} entries, chain intact, last hash "
                           f"{head.last_hash}")


@app.command()
def demo(
    data: Annotated[Path | None, typer.Option(
        help="Folder with one sub-folder per site (default: generate built-in hospitals)"
    )] = None,
    out: Annotated[Path | None, typer.Option(help="New folder for everything the demo "
                                                  "writes (default: runs/demo-<time>)")] = None,
    config: Annotated[Path | None, typer.Option(
        help="Run config TOML (default: configs/demo.toml, or configs/cxr-lung-seg.toml "
        "with --data)"
    )] = None,
    rounds: Annotated[int | None, typer.Option(help="Override num-rounds")] = None,
    patients: Annotated[int, typer.Option(help="Patients per generated hospital")] = 100,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a run-config key, e.g. --set central-dp-enabled=true "
        "(repeatable; values in TOML syntax, bare words are strings)")] = None,
    site_policy: Annotated[list[str] | None, typer.Option(
        "--site-policy", help="A policy key in every site's node config, e.g. "
        "--site-policy require-dp=false for a deliberate no-DP baseline (repeatable)")] = None,
) -> None:
    """Run a whole federation on this host: 3 hospitals, TLS, node auth, DP, SecAgg+."""
    from rich.console import Console

    from fedrad.demo import CONFIGS, DemoFailed, run_demo

    console = Console(soft_wrap=True)  # paths printed whole, never wrapped
    if data is not None and not data.is_dir():
        raise typer.BadParameter(f"{data} is not a folder", param_hint="--data")
    config_file = config or CONFIGS / ("cxr-lung-seg.toml" if data else "demo.toml")
    out_dir = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    overrides = {**_parse_sets(set_ or []), **({"num-rounds": rounds} if rounds else {})}
    policy = _parse_policy(site_policy or [])
    try:
        with console.status("starting") as status:
            result = run_demo(out_dir, data=data, config_file=config_file, overrides=overrides,
                              patients=patients, site_policy=policy,
                              say=lambda line: console.print(line, highlight=False),
                              tick=lambda text: status.update(text))
    except DemoFailed as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"[green]done[/green] in {result.seconds:.0f}s; run folder {result.run_dir}")
    best = json.loads((result.run_dir / "registry.json").read_text()).get("best")
    if best:
        console.print(f"best model: {result.run_id}:best = round {best['round']}, pooled "
                      f"{best['metric']} {best['score']:.3f} (fedrad models export "
                      f"{result.run_id}:best --consortium {result.out / 'consortium'} ...)")
    console.print(f"report: {result.report}")


def _parse_sets(items: list[str]) -> dict[str, object]:
    """KEY=VALUE pairs; VALUE read as a TOML value (true, 1.5, "x"), else as a string."""
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip()
    return out


def _parse_policy(items: list[str]) -> dict[str, object]:
    """--site-policy KEY=VALUE pairs: only the site-policy keys of the node config."""
    from client.site_policy import SitePolicy
    from common.config import ConfigError

    values = _parse_sets(items)
    unknown = sorted(set(values) - SitePolicy.keys())
    if unknown:
        raise typer.BadParameter(f"unknown policy key(s) {unknown}; allowed: "
                                 f"{sorted(SitePolicy.keys())}", param_hint="--site-policy")
    try:
        SitePolicy.from_mapping(values)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--site-policy") from exc
    return values


@site_app.command("start")
def site_start(
    kit: Annotated[Path, typer.Option(help="The startup kit from the coordinator")],
    data: Annotated[Path | None, typer.Option(help="The site's DICOM export folder")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="The site's work folder (cache, "
                                                       "privacy ledger, logs, kit)")] = None,
    epsilon_budget: Annotated[float | None, typer.Option(
        help="The site's total privacy budget across all runs")] = None,
    config: Annotated[Path | None, typer.Option(
        help="The site's node config TOML (the kit's node-config.toml, filled in); flags "
        "override it")] = None,
    superlink: Annotated[str | None, typer.Option(
        help="SuperLink host:port (default: the kit's)")] = None,
    passphrase_file: Annotated[Path | None, typer.Option(
        help="Passphrase of a sealed kit (default: $FEDRAD_KIT_PASSPHRASE)")] = None,
    worker: Annotated[bool, typer.Option(help="Also run the site worker")] = True,
    warm_launcher: Annotated[bool, typer.Option(
        help="Run ClientApps from fedrad's warm launcher (Flower imported once, a fork per "
        "message) instead of Flower's flower-superexec (a fresh process per message)")] = True,
    site_policy: Annotated[list[str] | None, typer.Option(
        "--site-policy", help="Override a policy key of the node config, e.g. "
        "max-epsilon-per-run=4 (repeatable; strict defaults otherwise)")] = None,
    allow_app: Annotated[list[str] | None, typer.Option(
        "--allow-app", help="Also run the signed app build with this sha256 (beside the "
        "kit's apps.json; repeatable)")] = None,
) -> None:
    """This hospital's node: SuperNode (TLS, node key, signed apps only) + site worker."""
    import tomllib

    from common.config import ConfigError
    from fedrad.kit import KitError, open_kit
    from fedrad.pacs import PacsError
    from fedrad.site_node import read_passphrase, start_site
    from fedrad.site_pull import refresh_from_node_config

    values: dict[str, object] = {}
    if config is not None:
        try:
            values = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise typer.BadParameter(f"{config}: {exc}", param_hint="--config") from exc
    values.update(_parse_policy(site_policy or []))
    flags = {"data-dir": data, "work-dir": work_dir, "epsilon-budget": epsilon_budget}
    values.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items()
                   if v is not None})
    try:
        values = refresh_from_node_config(values, say=typer.echo)
        opened = open_kit(kit, read_passphrase(passphrase_file))
        values.setdefault("site-id", opened.info["site"])
        missing = sorted({"data-dir", "work-dir", "epsilon-budget"} - set(values))
        if missing:
            raise ConfigError(f"missing {missing}: pass --data, --work-dir and "
                              "--epsilon-budget, or --config with those keys")
        pins = tuple(allow_app or [])
        if any(len(p) != 64 or set(p) - set("0123456789abcdef") for p in pins):
            raise typer.BadParameter("--allow-app takes a FAB's sha256 (64 hex digits)",
                                     param_hint="--allow-app")
        code = start_site(opened, values, superlink=superlink, say=typer.echo, worker=worker,
                          allow_apps=pins,
                          warm_launcher=warm_launcher)
    except KitError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kit") from exc
    except PacsError as exc:
        typer.echo(f"site not started: {exc} (instances already pulled are kept)", err=True)
        raise typer.Exit(1) from exc
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config/--data/--work-dir") from exc
    raise typer.Exit(code)


@site_app.command("worker")
def site_worker(
    work_dir: Annotated[Path, typer.Option(help="The site's work folder (node config "
                                                "work-dir)")],
) -> None:
    """Keep the training stack imported and the site's data warm for its SuperNode.

    Start it beside the SuperNode, with the same work folder; the ClientApp uses it
    when it is running and trains in its own process otherwise.
    """
    from client.worker import serve

    serve(work_dir.expanduser().resolve())


@site_app.command("check")
def site_check(
    data: Annotated[Path, typer.Option(help="The site's DICOM export folder (with "
                                            "--dicomweb: the folder to pull into)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    dicomweb: Annotated[str | None, typer.Option(
        "--dicomweb", help="Pull from this PACS' DICOMweb root into --data first")] = None,
    credentials: Credentials = None,
    ca_bundle: CaBundle = None,
    study_filter: StudyFilter = None,
    labels: Annotated[Path | None,
                      typer.Option(help="labels CSV (default: DATA/labels.csv)")] = None,
    labels_key: Annotated[str, typer.Option(
        help="labels column that identifies an image: sop_instance_uid, accession_number "
        "or study_instance_uid")] = "sop_instance_uid",
) -> None:
    """What this site can train on; exits non-zero only when nothing usable was found."""
    from client.site_check import check_site

    if dicomweb is not None:
        from fedrad.pacs import PacsConnection, PacsError
        from fedrad.site_pull import parse_filters, pull

        try:
            pull(PacsConnection(dicomweb, credentials, ca_bundle), data,
                 filters=parse_filters(study_filter or []),
                 labels=labels, say=lambda line: typer.echo(line, err=True))
        except PacsError as exc:
            typer.echo(f"site check stopped: {exc} (instances already pulled are kept)",
                       err=True)
            raise typer.Exit(1) from exc
    if not data.is_dir():
        raise typer.BadParameter(f"{data} is not a folder", param_hint="--data")
    from client.dicom_scan import walk_files
    from client.labels import LabelsError

    total = len(walk_files(data, []))
    try:
        with progress_bar("checking", silent=as_json) as advance:
            summary = check_site(data, labels, labels_key,
                                 progress=lambda done: advance(done, total))
    except LabelsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--labels/--labels-key") from exc
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        for key, value in summary.items():
            if key != "skipped":
                typer.echo(f"{key}: {value}")
        for entry in summary["skipped"]:
            typer.echo(f"skipped {entry['file']}: {entry['reason']}")
    if summary["images"] == 0:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
