"""`fedrad run ...` and `fedrad models ...`: the coordinator's and researcher's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fedrad.cli_output import AsJson, Output
from fedrad.cli_pacs import CaBundle, Credentials, progress_bar

run_app = typer.Typer(help="Launch and watch runs on the consortium's SuperLink.",
                      no_args_is_help=True)
models_app = typer.Typer(help="Global models in the run folders: list, show, export.",
                         no_args_is_help=True)

Consortium = Annotated[Path, typer.Option(help="The consortium folder")]
StateDir = Annotated[Path | None, typer.Option(
    help="The server's --state-dir, if it was given one (default <consortium>/server)")]
RunId = Annotated[str, typer.Argument(help="The run id `fedrad run launch` printed")]
VerifyKey = Annotated[Path | None, typer.Option(
    help="The consortium's signing.pub (the kit's); required for an exported folder")]
RegistryConsortium = Annotated[Path | None, typer.Option(
    help="The consortium folder, for a registry name RUN[:ROUND|:best]")]


def _home(consortium: Path, state_dir: Path | None) -> Any:
    from fedrad.server_node import ServerHome

    return ServerHome(consortium.resolve(), state_dir.resolve() if state_dir else None)


def _fail(what: str, exc: Exception) -> typer.Exit:
    typer.echo(f"{what}: {exc}", err=True)
    return typer.Exit(1)


def _errors() -> tuple[type[Exception], ...]:
    """The errors a command reports (and exits 1 on) instead of a traceback."""
    from common.config import ConfigError
    from fedrad.model_registry import ModelRegistryError
    from fedrad.processes import DeploymentError
    from fedrad.runs import RunError

    return ConfigError, RunError, DeploymentError, ModelRegistryError


@run_app.command("launch")
def run_launch(
    config: Annotated[Path, typer.Argument(help="Run config TOML, e.g. configs/cxr-classify.toml")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a key, e.g. --set strategy=fedtrimmedavg (repeatable)")] = None,
    consortium: Consortium = Path("consortium"),
    state_dir: StateDir = None,
    detach: Annotated[bool, typer.Option(help="Print the run id and return")] = False,
    as_json: AsJson = False,
) -> None:
    """Check the config against the schema, submit it, and show progress by round."""
    from fedrad.cli import _parse_sets
    from fedrad.runs import follow, load_run_config, submit

    what, errors = "run not launched", _errors()
    home = _home(consortium, state_dir)
    try:
        values = load_run_config(config, _parse_sets(set_ or []))
        submitted = submit(home, values)
    except errors as exc:
        raise _fail(what, exc) from exc
    out = Output(as_json)
    launched = {"run_id": str(submitted.run_id), "folder": str(submitted.run_dir),
                "rounds": submitted.total_rounds}
    line = (f"run {submitted.run_id} submitted ({config.name}, {submitted.total_rounds} "
            f"rounds, strategy {values.get('strategy', 'fedavg')}); folder {submitted.run_dir}")
    if detach:
        out.result({**launched, "status": "submitted"}, line)
        return
    out.say(line)
    timeout = float(values.get("round-timeout", 900.0)) * (submitted.total_rounds + 1)
    status = follow(home, submitted, out.say, timeout=timeout)
    out.result({**launched, "status": status}, f"run {submitted.run_id}: {status}")
    if status != "finished:completed":
        raise typer.Exit(1)


@run_app.command("track")
def run_track(
    run_id: Annotated[str, typer.Argument(help="The run id")],
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: file store ./mlruns)")] = None,
    consortium: Consortium = Path("consortium"),
    state_dir: StateDir = None,
    signing_key: Annotated[Path | None, typer.Option(
        help="Signs the best-round model logged as an artifact (default "
        "<consortium>/signing.key; without one no model is logged)")] = None,
    as_json: AsJson = False,
) -> None:
    """Log a run to MLflow: config as parameters, pooled metrics per round, one child run
    per site, ε per site, the best model; again later, only new rounds are logged."""
    from common.model_signing import load_signing_key
    from fedrad.mlflow_tracking import TrackingError, track_run

    uri = tracking_uri or (Path.cwd() / "mlruns").as_uri()
    key_path = signing_key or consortium / "signing.key"
    errors: tuple[type[Exception], ...] = (*_errors(), TrackingError, LookupError, OSError)
    try:
        key = load_signing_key(key_path) if key_path.is_file() else None
        logged = track_run(_home(consortium, state_dir).root, run_id, uri, key)
    except errors as exc:
        raise _fail(f"run {run_id} not tracked", exc) from exc
    if as_json:
        typer.echo(json.dumps(logged))
        return
    typer.echo(f"run {run_id} → MLflow run {logged['mlflow_run_id']} at {uri}: rounds "
               f"{logged['rounds_logged'] or 'none new'}, sites {logged['sites'] or '-'}"
               + (f", best model (round {logged['best_model_round']})"
                  if logged["best_model_round"] is not None else ""))


@run_app.command("list")
def run_list(consortium: Consortium = Path("consortium"), state_dir: StateDir = None,
             as_json: AsJson = False) -> None:
    """Every run the SuperLink knows, with the rounds recorded."""
    from fedrad.runs import list_runs

    what, errors = "cannot list runs", _errors()
    try:
        runs = list_runs(_home(consortium, state_dir))
    except errors as exc:
        raise _fail(what, exc) from exc
    if as_json:
        typer.echo(json.dumps(runs))
        return
    for run in runs:
        typer.echo(f"{run['run_id']:>22}  {run['status']:<20} rounds {run['rounds_done']:<3} "
                   f"{run['app']}")


@run_app.command("status")
def run_status(run_id: RunId, consortium: Consortium = Path("consortium"),
               state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """Status, rounds done, the participation table and ε per site."""
    from fedrad.runs import run_status as status_of

    what, errors = f"no status for run {run_id}", _errors()
    try:
        status = status_of(_home(consortium, state_dir), run_id)
    except errors as exc:
        raise _fail(what, exc) from exc
    if as_json:
        typer.echo(json.dumps(status))
        return
    typer.echo(f"run {run_id}: {status['status']} ({status['rounds_done']}/"
               f"{status['num_rounds']} rounds, strategy {status['strategy']}); "
               f"folder {status['run_dir']}")
    if status["last"]:
        typer.echo(f"round {status['last']['round']}: pooled {status['last']['metric']} "
                   f"{status['last']['pooled']:.3f}")
    for site, cells in status["participation"].items():
        typer.echo(f"  {site:<16} " + " ".join(f"{c:<8}" for c in cells))
    for site, eps in sorted(status["epsilon"].items()):
        typer.echo(f"  ε {site}: {eps:.3f}")


@run_app.command("logs")
def run_logs(run_id: RunId, consortium: Consortium = Path("consortium"),
             state_dir: StateDir = None) -> None:
    """The ServerApp's log of the run (Flower's `flwr log`)."""
    from fedrad.runs import logs

    what, errors = f"no logs for run {run_id}", _errors()
    try:
        typer.echo(logs(_home(consortium, state_dir), run_id))
    except errors as exc:
        raise _fail(what, exc) from exc


@run_app.command("stop")
def run_stop(run_id: RunId, consortium: Consortium = Path("consortium"),
             state_dir: StateDir = None, as_json: AsJson = False) -> None:
    """Stop a run; its checkpoints stay, and `fedrad run resume` can continue it."""
    from fedrad.runs import stop

    what, errors = f"run {run_id} not stopped", _errors()
    try:
        stop(_home(consortium, state_dir), run_id)
    except errors as exc:
        raise _fail(what, exc) from exc
    Output(as_json).result({"run_id": run_id, "status": "stop-requested"},
                           f"run {run_id}: stop requested")


@run_app.command("resume")
def run_resume(run_id: RunId, consortium: Consortium = Path("consortium"),
               state_dir: StateDir = None,
               detach: Annotated[bool, typer.Option(help="Return once submitted")] = False,
               as_json: AsJson = False) -> None:
    """Continue a stopped or crashed run after its last checkpointed round, with the
    same config and the strategy's saved state."""
    from fedrad.runs import follow, resume

    what, errors = f"run {run_id} not resumed", _errors()
    home = _home(consortium, state_dir)
    try:
        submitted = resume(home, run_id)
    except errors as exc:
        raise _fail(what, exc) from exc
    out = Output(as_json)
    resumed = {"run_id": submitted.run_dir.name, "flower_run_id": str(submitted.run_id)}
    line = f"run {submitted.run_dir.name} resumed as Flower run {submitted.run_id}"
    if detach:
        out.result({**resumed, "status": "submitted"}, line)
        return
    out.say(line)
    status = follow(home, submitted, out.say, timeout=900.0 * submitted.total_rounds)
    out.result({**resumed, "status": status}, f"run {submitted.run_id}: {status}")
    if status != "finished:completed":
        raise typer.Exit(1)


@models_app.command("list")
def models_list(consortium: Consortium = Path("consortium"), state_dir: StateDir = None,
                all_rounds: Annotated[bool, typer.Option(help="Every round's checkpoint, "
                                                               "not only the last")] = False,
                as_json: AsJson = False) -> None:
    """The global models of every run (RUN:ROUND): by default each run's last round and
    its best (tagged `best`)."""
    from fedrad.model_registry import list_models

    models = list_models(_home(consortium, state_dir).root, all_rounds=all_rounds)
    if as_json:
        typer.echo(json.dumps(models))
        return
    for m in models:
        score = "-" if m["pooled_score"] is None else f"{m['pooled_score']:.3f}"
        typer.echo(f"{m['name']:<26} {m['task']:<13} {m['model']:<12} {m['strategy']:<14} "
                   f"rounds {m['rounds']:<7} {m['metric']} {score}  {m['run_status']}  "
                   f"sha256 {m['sha256']}" + ("  best" if m["best"] else ""))


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(help="RUN, RUN:ROUND or RUN:best")],
                consortium: Consortium = Path("consortium"),
                state_dir: StateDir = None) -> None:
    """One model's description: architecture, preprocessing, metrics, ε per site."""
    from fedrad.model_registry import describe, resolve

    what, errors = f"no model {name}", _errors()
    try:
        run, ref = resolve(_home(consortium, state_dir).root, name)
        typer.echo(json.dumps(describe(run, ref), indent=1, sort_keys=True))
    except errors as exc:
        raise _fail(what, exc) from exc


@models_app.command("export")
def models_export(
    name: Annotated[str, typer.Argument(help="RUN, RUN:ROUND or RUN:best")],
    out: Annotated[Path, typer.Option(help="New folder for the export")],
    consortium: Consortium = Path("consortium"),
    state_dir: StateDir = None,
    signing_key: Annotated[Path | None, typer.Option(
        help="The consortium's model-signing key (default <consortium>/signing.key)")] = None,
    export_format: Annotated[str, typer.Option(
        "--format", help="fedrad (model.pt, model.json, model.sig) or monai-bundle "
        "(configs/, models/model.pt + model.ts, scripts/; signed manifest)")] = "fedrad",
    clinical_use: Annotated[bool, typer.Option(
        help="monai-bundle: do not mark the bundle not_for_clinical_use (the consortium "
        "has validated it clinically)")] = False,
    as_json: AsJson = False,
) -> None:
    """A global model, signed by the consortium: fedrad's own format or a MONAI bundle."""
    from common.model_signing import load_signing_key
    from fedrad.model_registry import export
    from fedrad.monai_bundle import export_bundle

    what = f"model {name} not exported"
    errors: tuple[type[Exception], ...] = (*_errors(), OSError)
    if export_format not in ("fedrad", "monai-bundle"):
        raise typer.BadParameter(f"expected fedrad or monai-bundle, got {export_format!r}",
                                 param_hint="--format")
    try:
        key = load_signing_key(signing_key or consortium / "signing.key")
        home = _home(consortium, state_dir).root
        folder = (export(home, name, out, key) if export_format == "fedrad" else
                  export_bundle(home, name, out, key, clinical_use=clinical_use))
    except errors as exc:
        raise _fail(what, exc) from exc
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    if as_json:
        typer.echo(json.dumps({"model": name, "format": export_format, "folder": str(folder),
                               "files": files}))
        return
    typer.echo(f"model {name} exported to {folder} ({', '.join(files)})")


def evaluate_command(
    model: Annotated[str, typer.Argument(help="An exported model folder, or RUN[:ROUND|:best] of "
                                              "the registry (with --consortium)")],
    data: Annotated[list[Path], typer.Option(
        help="A DICOM folder to evaluate on (repeatable: one per site, reported per site "
        "and pooled)")],
    verify_key: VerifyKey = None,
    consortium: RegistryConsortium = None,
    state_dir: StateDir = None,
    labels_file: Annotated[Path | None, typer.Option(
        help="labels.csv for classification (default <data>/labels.csv)")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="Cache folder for decoded images (default: a temporary one)")] = None,
    as_json: AsJson = False,
) -> None:
    """AUROC with 95 % bootstrap CI, sensitivity/specificity, calibration (ECE); or Dice
    and HD95 distributions; per site and pooled. Local data never leaves this machine."""
    import tempfile

    from client.dataset import DatasetError
    from fedrad.evaluation import EvaluationError, evaluate, load_data, load_model

    errors: tuple[type[Exception], ...] = (*_errors(), EvaluationError, DatasetError, OSError)
    home = _home(consortium, state_dir).root if consortium else None
    try:
        loaded = load_model(model, server_home=home, verify_key=verify_key)
        with tempfile.TemporaryDirectory(prefix="fedrad-eval-") as scratch:
            sites = {}
            for folder in data:
                if not folder.is_dir():
                    raise EvaluationError(f"--data {folder} is not a folder")
                cache = (work_dir or Path(scratch)) / folder.resolve().name
                with progress_bar(f"reading {folder.name}", silent=as_json) as advance:
                    sites[folder.resolve().name] = load_data(loaded.config, folder, cache,
                                                             labels_file, advance)
            result = evaluate(loaded, sites)
    except errors as exc:
        raise _fail(f"model {model} not evaluated", exc) from exc
    result.pop("_arrays")
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"model {result['model']} ({result['task']}) on {result['n_images']} images")
    baseline = result["pooled_baseline"]
    if baseline:
        typer.echo(f"  in its run: pooled validation {baseline['metric']} "
                   f"{baseline['validation_score']:.3f} = {baseline['ratio']:.3f} x the pooled "
                   f"baseline's {baseline['score']:.3f} ({baseline['source']})")
    for site, values in result["per_site"].items():
        if "auroc" in values:
            cells = ", ".join(f"{label} {v:.3f} [{values['auroc_ci'][label][0]:.3f}, "
                              f"{values['auroc_ci'][label][1]:.3f}]"
                              for label, v in values["auroc"].items())
            typer.echo(f"  {site} ({values['n_images']} images): AUROC {cells}")
        else:
            typer.echo(f"  {site} ({values['n_images']} images): Dice {values['dice_mean']:.3f}"
                       f" [{values['dice_ci'][0]:.3f}, {values['dice_ci'][1]:.3f}], HD95 "
                       f"median {values['hd95'].get('median', float('nan')):.2f} px")


def predict_command(
    model: Annotated[str, typer.Argument(help="An exported model folder, or RUN[:ROUND|:best] "
                                              "(with --consortium)")],
    study: Annotated[Path | None, typer.Argument(
        help="One DICOM study folder (or --dicomweb with --study)")] = None,
    out: Annotated[Path, typer.Option(help="Folder for SEG/SR files, results.json, "
                                           "overlays")] = Path("prediction"),
    verify_key: VerifyKey = None,
    consortium: RegistryConsortium = None,
    state_dir: StateDir = None,
    dicomweb: Annotated[str | None, typer.Option(
        "--dicomweb", help="Read the study from this PACS' DICOMweb root and store the "
        "SEG/SR results back into it (STOW-RS)")] = None,
    study_uid: Annotated[str | None, typer.Option(
        "--study", help="StudyInstanceUID of the study in the PACS (with --dicomweb)")] = None,
    credentials: Credentials = None,
    ca_bundle: CaBundle = None,
    as_json: AsJson = False,
) -> None:
    """Segmentation as DICOM SEG, classification as DICOM SR, plus results.json keyed by
    the study's UIDs and an overlay PNG per image; with --dicomweb, stored back into the
    PACS. Refuses a model whose signature does not verify."""
    import tempfile

    from fedrad.evaluation import EvaluationError, load_model
    from fedrad.pacs import PacsConnection, PacsError, store
    from fedrad.predict import predict_study, result_files
    from fedrad.site_pull import pull

    errors: tuple[type[Exception], ...] = (*_errors(), EvaluationError, PacsError, OSError)
    home = _home(consortium, state_dir).root if consortium else None
    try:
        if (dicomweb is None) == (study is None) or (dicomweb is None) != (study_uid is None):
            raise EvaluationError("give a study folder, or --dicomweb URL with --study UID")
        if out.exists() and any(out.iterdir()):
            raise EvaluationError(f"--out {out} is not empty; choose a new folder")
        loaded = load_model(model, server_home=home, verify_key=verify_key)
        if dicomweb is None:
            assert study is not None  # checked above
            if not study.is_dir():
                raise EvaluationError(f"{study} is not a folder; give the study's DICOM folder")
            results = predict_study(loaded, study, out)
        else:
            connection = PacsConnection(dicomweb, credentials, ca_bundle)
            with tempfile.TemporaryDirectory(prefix="fedrad-study-") as scratch:
                fetched = pull(connection, Path(scratch),
                               filters={"StudyInstanceUID": str(study_uid)})
                if fetched.new == 0:
                    raise EvaluationError(f"{dicomweb} has no study {study_uid}")
                results = predict_study(loaded, Path(scratch), out)
            results["stored"] = {"pacs": dicomweb,
                                 "sop_instance_uids": store(connection,
                                                            result_files(out, results))}
            (out / "results.json").write_text(json.dumps(results, indent=1))
    except errors as exc:
        raise _fail(f"no prediction with model {model}", exc) from exc
    if as_json:
        typer.echo(json.dumps(results))
        return
    for number, image in enumerate(results["images"], start=1):
        if "labels" in image:
            calls = ", ".join(f"{label} {v['probability']:.2f}{' +' if v['positive'] else ''}"
                              for label, v in image["labels"].items())
            typer.echo(f"image {number}: {calls} ({image['sr_file']})")
        else:
            typer.echo(f"image {number}: {image['seg_file']} (lung "
                       f"{image['foreground_fraction']:.0%} of the image)")
    for skipped in results["skipped"]:
        typer.echo(f"skipped {skipped['file']}: {skipped['reason']}")
    if "stored" in results:
        typer.echo(f"stored {len(results['stored']['sop_instance_uids'])} result object(s) "
                   f"in {dicomweb}")
    typer.echo(f"results in {out}")


def report_command(
    run_id: Annotated[str, typer.Argument(
        help="The run id; RUN:best or RUN:ROUND picks the model --data sections show")],
    out: Annotated[Path | None, typer.Option(help="The HTML file to write (default "
                                                  "report-<RUN>.html here)")] = None,
    data: Annotated[list[Path] | None, typer.Option(
        help="Local DICOM folder(s): add ROC/reliability or Dice plots and Grad-CAM "
        "overlays of the run's last model (or RUN:best's) on them (repeatable)")] = None,
    consortium: Consortium = Path("consortium"),
    state_dir: StateDir = None,
    labels_file: Annotated[Path | None, typer.Option(
        help="labels.csv for classification (default <data>/labels.csv)")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="Cache folder for decoded images (default: a temporary one)")] = None,
) -> None:
    """An HTML report: learning curves per site, participation, privacy spent; with
    --data, ROC/Dice and Grad-CAM rendered from local data only."""
    import tempfile

    from client.dataset import DatasetError
    from fedrad.evaluation import EvaluationError
    from fedrad.report import write_run_report

    errors: tuple[type[Exception], ...] = (*_errors(), EvaluationError, DatasetError, OSError,
                                           LookupError)
    target = out or Path(f"report-{run_id.replace(':', '-')}.html")
    try:
        with tempfile.TemporaryDirectory(prefix="fedrad-report-") as scratch:
            path = write_run_report(_home(consortium, state_dir).root, run_id,
                                    data=data or [], out=target,
                                    work_dir=work_dir or Path(scratch), labels_file=labels_file)
    except errors as exc:
        raise _fail(f"no report for run {run_id}", exc) from exc
    typer.echo(f"report: {path}")
