"""`fedrad pretrain`: the coordinator's command for a privacy-free prior (fedrad.pretrain)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def pretrain_command(
    config: Annotated[Path, typer.Argument(help="The run config TOML the prior is for")],
    out: Annotated[Path, typer.Option(help="The weights file to write (and OUT.json)")],
    data: Annotated[Path | None, typer.Option(
        help="A folder of site folders the consortium may pool (public data); default: "
        "generated phantoms (lung-seg)")] = None,
    patients: Annotated[int, typer.Option(help="Phantom patients per hospital")] = 200,
    epochs: Annotated[int, typer.Option(help="Epochs; the best one is kept")] = 30,
    randomise: Annotated[bool, typer.Option(
        help="Domain randomisation (wide affine; gamma, blur, noise, contrast), so a prior "
        "trained on phantoms transfers to real radiographs; --no-randomise: the config's "
        "own augmentation")] = True,
) -> None:
    """Train the config's model on data that is no hospital's patients (no DP, no ε), for
    `init-weights = OUT`; the provenance goes to OUT.json and into each run's registry."""
    from common.config import ConfigError, RunConfig
    from common.models import ModelError
    from fedrad.pretrain import PretrainError, pretrain
    from fedrad.runs import load_run_config

    try:
        run_config = RunConfig.from_mapping(load_run_config(config, {}))
        provenance = pretrain(run_config, out, data=data, patients=patients, epochs=epochs,
                              randomise=randomise, say=typer.echo)
    except (ConfigError, ModelError, PretrainError, OSError, ValueError) as exc:
        typer.echo(f"no prior written: {exc}", err=True)
        raise typer.Exit(1) from exc
    held = provenance["held_out"]
    typer.echo(f"prior {out} (sha256 {provenance['sha256'][:16]}): best epoch "
               f"{provenance['best_epoch']}/{epochs}, held-out {held['metric']} "
               f"{held['score']:.3f}; set init-weights = \"{out.resolve()}\" in the run config")
