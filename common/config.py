"""Typed run configuration, parsed once at the edge.

Run-wide settings arrive as Flower's flat `run_config` mapping (from
`[tool.flwr.app.config]` in pyproject.toml, overridden by `configs/*.toml`).
`RunConfig.from_mapping` is the only place that reads them: an unknown key or a
bad value raises `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration key is unknown, missing or has a bad value."""


class Task(enum.StrEnum):
    """What a run trains."""

    LUNG_SEG = "lung-seg"  # 2D: projection images and their lung masks
    CXR_CLASSIFY = "cxr-classify"  # 2D: projection images and labels.csv findings
    VOLUME_SEG = "volume-seg"  # 3D: CT/MR volumes and a label map (one foreground class)

    @property
    def spatial_dims(self) -> int:
        return 3 if self is Task.VOLUME_SEG else 2

    @property
    def is_segmentation(self) -> bool:
        return self is not Task.CXR_CLASSIFY


class Model(enum.StrEnum):
    """The network a run trains (MONAI)."""

    UNET = "unet"
    BASIC_UNET = "basicunet"
    SEGRESNET = "segresnet"
    DENSENET121 = "densenet121"
    CLASSIFIER = "classifier"  # MONAI Classifier: strided residual units, for 28-64 px


class Norm(enum.StrEnum):
    """The normalisation layers of a segmentation network (DP-SGD allows no BatchNorm)."""

    GROUP = "group"  # GroupNorm, 8 groups
    INSTANCE = "instance"  # InstanceNorm with affine weights (works on a 1-channel layer)


class Optimizer(enum.StrEnum):
    """Local optimiser."""

    ADAM = "adam"
    SGD = "sgd"


class OptimizerState(enum.StrEnum):
    """What the local optimiser remembers from one round to the next at a site."""

    FRESH = "fresh"  # a new optimiser every round (moments start from zero)
    KEPT = "kept"  # the site keeps its optimiser's moments across the run's rounds


class Strategy(enum.StrEnum):
    """How the server combines the sites' updates (Flower's Message-API strategies)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"  # FedAvg on the server; sites pull towards the global model
    FEDADAM = "fedadam"  # server-side Adam on the averaged update
    FEDMEDIAN = "fedmedian"  # coordinate-wise median (robust)
    FEDTRIMMEDAVG = "fedtrimmedavg"  # coordinate-wise trimmed mean (robust)
    KRUM = "krum"  # the update closest to its neighbours (robust)

    @property
    def needs_individual_updates(self) -> bool:
        """Robust rules look at each site's update, which secure aggregation hides."""
        return self in {Strategy.FEDMEDIAN, Strategy.FEDTRIMMEDAVG, Strategy.KRUM}


class UpdateDType(enum.StrEnum):
    """How a site's update travels without secure aggregation (it sends integers anyway)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"  # half the bytes; the server averages in float32


class Trainable(enum.StrEnum):
    """Which parameters a site trains (and DP-SGD clips and noises); the rest stay
    bit-identical to the global model the site received (a prior's features)."""

    ALL = "all"
    NORM_BIAS = "norm-bias"  # normalisation weights and every bias (BiTFiT)
    HEAD = "head"  # the network's last layer
    NORM_BIAS_HEAD = "norm-bias-head"


# init-weights value: the config's model pretrained on phantoms, made at submission
# (fedrad.pretrain.resolve_prior)
PHANTOM_PRIOR = "phantom-prior"


class DPMode(enum.StrEnum):
    """Where DP-SGD's noise is added (client.distributed_dp explains distributed)."""

    LOCAL = "local"  # each site adds all of σ to its own local steps
    DISTRIBUTED = "distributed"  # each of K sites adds σ/√K; the secure sum carries σ


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy (Opacus DP-SGD) settings of a run."""

    enabled: bool
    target_epsilon: float
    delta: float | None  # None: chosen per site below 1/N
    max_grad_norm: float
    trainable: Trainable  # what local training updates, with or without DP
    mode: DPMode
    sample_rate: float  # distributed mode: the chance that a step draws a patient

    @property
    def distributed(self) -> bool:
        return self.enabled and self.mode is DPMode.DISTRIBUTED

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not self.target_epsilon > 0:
            raise ConfigError(f"dp-target-epsilon must be > 0, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"dp-delta must be in (0, 1) or 'auto', got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"dp-max-grad-norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"dp-sample-rate must be in (0, 1], got {self.sample_rate}")


class Intensity(enum.StrEnum):
    """The intensity part of augmentation (client.augmentation)."""

    MILD = "mild"  # contrast x0.9-1.1 and brightness +-0.05
    # domain randomisation: also gamma 0.5-2, Gaussian blur and noise, contrast x0.6-1.4
    # (what a prior trained on phantoms needs to meet real radiographs)
    STRONG = "strong"


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation: a random affine applied to the image and its mask
    together (rotation, scale, shift), then intensity (contrast, brightness) on the image."""

    enabled: bool
    probability: float  # chance that an image gets the affine at all
    rotation: float  # degrees, uniform in [-rotation, rotation] (each axis in 3D)
    scale: float  # relative, uniform in [1 - scale, 1 + scale]
    shift: float  # fraction of the image size, uniform in [-shift, shift] per axis
    intensity: Intensity

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1:
            raise ConfigError(f"augment-probability must be in [0, 1], got {self.probability}")
        if not 0 <= self.rotation <= 45:
            raise ConfigError(f"augment-rotation must be in [0, 45] degrees, got "
                              f"{self.rotation}")
        if not 0 <= self.scale < 0.5:
            raise ConfigError(f"augment-scale must be in [0, 0.5), got {self.scale}")
        if not 0 <= self.shift < 0.5:
            raise ConfigError(f"augment-shift must be in [0, 0.5), got {self.shift}")


@dataclass(frozen=True)
class CentralDPConfig:
    """Central (site-level) DP: each site clips its update to `clipping_norm`, the server
    adds Gaussian noise of std noise_multiplier x clipping_norm / sites to the mean of
    the clipped updates (uniform weights), under secure aggregation or not."""

    enabled: bool
    noise_multiplier: float
    clipping_norm: float
    delta: float

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not self.noise_multiplier > 0:
            raise ConfigError("central-dp-noise-multiplier must be > 0, got "
                              f"{self.noise_multiplier}")
        if not self.clipping_norm > 0:
            raise ConfigError(f"central-dp-clipping-norm must be > 0, got {self.clipping_norm}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"central-dp-delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class SecAggConfig:
    """secure aggregation settings of a run."""

    enabled: bool
    min_sites: int
    allow_fewer_sites: bool
    clipping_range: float
    quantization_range: int
    max_weight: float

    def __post_init__(self) -> None:
        if self.min_sites < 2:
            raise ConfigError(f"secagg-min-sites must be >= 2, got {self.min_sites}")
        if not self.clipping_range > 0:
            raise ConfigError(f"secagg-clipping-range must be > 0, got {self.clipping_range}")
        if not 0 < self.quantization_range < 2**32:
            raise ConfigError("secagg-quantization-range must be in (0, 2**32)")
        if not self.max_weight > 0:
            raise ConfigError(f"secagg-max-weight must be > 0, got {self.max_weight}")


@dataclass(frozen=True)
class StrategyConfig:
    """The aggregation rule and its settings."""

    name: Strategy
    proximal_mu: float  # fedprox: pull of each local step towards the global model
    server_learning_rate: float  # fedadam: the server optimiser's step (eta)
    trim_fraction: float  # fedtrimmedavg: share cut at each end, per coordinate
    krum_byzantine: int  # krum: how many hostile sites to tolerate

    def __post_init__(self) -> None:
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if not self.server_learning_rate > 0:
            raise ConfigError(f"server-learning-rate must be > 0, got "
                              f"{self.server_learning_rate}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}")


@dataclass(frozen=True)
class FaultConfig:
    """What a round tolerates: k-of-n participation and updates to reject."""

    min_train_sites: int  # k: a round completes when at least k sites' updates count
    max_update_norm: float  # an update with a larger L2 norm is rejected; 0 = no bound
    evaluate_every: int  # federated evaluation every N rounds (and always the last)
    cross_site: bool  # after the last round: every site's local model at every site
    max_in_flight: int  # training requests out at once (the next goes as a reply comes); 0 = all

    def __post_init__(self) -> None:
        if not self.max_update_norm >= 0:
            raise ConfigError(f"max-update-norm must be >= 0 (0 = no bound), got "
                              f"{self.max_update_norm}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, on both sides."""

    task: Task
    model: Model
    res_units: int  # unet: residual units per level (0: plain convolutions)
    norm: Norm  # unet, basicunet, segresnet: normalisation layers
    labels: tuple[str, ...]  # cxr-classify: labels.csv columns, one sigmoid output each
    threshold: float  # operating point for sensitivity/specificity and binary masks
    init_weights: str  # a local state-dict file the server starts from; "" = random init
    resume_from: str  # a run id whose last checkpoint this run continues; "" = a new run
    foreground: tuple[int, ...]  # volume-seg: label-map values that count as foreground
    num_rounds: int
    min_sites: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: Optimizer
    optimizer_state: OptimizerState
    early_stop_patience: int  # stop after this many rounds without a better pooled score; 0 = off
    image_size: int
    voi_window: bool  # intensities through the image's own VOI window, not full range
    augment: AugmentConfig
    val_fraction: float
    seed: int
    round_timeout: float
    update_dtype: UpdateDType
    strategy: StrategyConfig
    faults: FaultConfig
    dp: DPConfig
    central_dp: CentralDPConfig
    secagg: SecAggConfig

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flat run_config; every key must be known."""
        unknown = sorted(set(raw) - set(_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; allowed keys: {sorted(_DEFAULTS)}"
            )
        values = {**_DEFAULTS, **raw}
        get = _Getter(values)
        delta_raw = values["dp-delta"]
        delta = None if delta_raw == "auto" else get.number("dp-delta")
        config = cls(
            task=get.choice("task", Task),
            model=get.choice("model", Model),
            res_units=get.integer("unet-res-units", minimum=0),
            norm=get.choice("norm", Norm),
            labels=get.names("labels"),
            threshold=get.number("threshold"),
            init_weights=get.text("init-weights"),
            resume_from=get.text("resume-from"),
            foreground=get.integers("foreground"),
            num_rounds=get.integer("num-rounds", minimum=1),
            min_sites=get.integer("min-sites", minimum=1),
            local_epochs=get.integer("local-epochs", minimum=1),
            batch_size=get.integer("batch-size", minimum=1),
            learning_rate=get.positive("learning-rate"),
            optimizer=get.choice("optimizer", Optimizer),
            optimizer_state=get.choice("optimizer-state", OptimizerState),
            early_stop_patience=get.integer("early-stop-patience", minimum=0),
            image_size=get.integer("image-size", minimum=16),
            voi_window=get.boolean("voi-window"),
            augment=AugmentConfig(
                enabled=get.boolean("augment"),
                probability=get.number("augment-probability"),
                rotation=get.number("augment-rotation"),
                scale=get.number("augment-scale"),
                shift=get.number("augment-shift"),
                intensity=get.choice("augment-intensity", Intensity),
            ),
            val_fraction=get.number("val-fraction"),
            seed=get.integer("seed", minimum=0),
            round_timeout=get.positive("round-timeout"),
            update_dtype=get.choice("update-dtype", UpdateDType),
            strategy=StrategyConfig(
                name=get.choice("strategy", Strategy),
                proximal_mu=get.number("proximal-mu"),
                server_learning_rate=get.number("server-learning-rate"),
                trim_fraction=get.number("trim-fraction"),
                krum_byzantine=get.integer("krum-byzantine", minimum=0),
            ),
            faults=FaultConfig(
                min_train_sites=get.integer("min-train-sites", minimum=1),
                max_update_norm=get.number("max-update-norm"),
                evaluate_every=get.integer("evaluate-every", minimum=1),
                cross_site=get.boolean("cross-site-validation"),
                max_in_flight=get.integer("max-sites-in-flight", minimum=0),
            ),
            dp=DPConfig(
                enabled=get.boolean("dp-enabled"),
                target_epsilon=get.number("dp-target-epsilon"),
                delta=delta,
                max_grad_norm=get.number("dp-max-grad-norm"),
                trainable=get.choice("dp-trainable", Trainable),
                mode=get.choice("dp-mode", DPMode),
                sample_rate=get.number("dp-sample-rate"),
            ),
            central_dp=CentralDPConfig(
                enabled=get.boolean("central-dp-enabled"),
                noise_multiplier=get.number("central-dp-noise-multiplier"),
                clipping_norm=get.number("central-dp-clipping-norm"),
                delta=get.number("central-dp-delta"),
            ),
            secagg=SecAggConfig(
                enabled=get.boolean("secagg-enabled"),
                min_sites=get.integer("secagg-min-sites", minimum=0),
                allow_fewer_sites=get.boolean("secagg-allow-fewer-sites"),
                clipping_range=get.number("secagg-clipping-range"),
                quantization_range=get.integer("secagg-quantization-range", minimum=1),
                max_weight=get.number("secagg-max-weight"),
            ),
        )
        segmentation_models = {Model.UNET, Model.BASIC_UNET, Model.SEGRESNET}
        if config.task.is_segmentation and config.model not in segmentation_models:
            raise ConfigError(f"model must be one of {sorted(m.value for m in segmentation_models)}"
                              f" for task {config.task.value}, got {config.model.value!r}")
        if config.task is Task.CXR_CLASSIFY and config.model not in {Model.DENSENET121,
                                                                      Model.CLASSIFIER}:
            raise ConfigError(f"model must be 'densenet121' or 'classifier' for task "
                              f"cxr-classify, got {config.model.value!r}")
        if config.res_units and config.model is Model.UNET and config.norm is Norm.GROUP:
            raise ConfigError("unet-res-units > 0 puts a norm layer on the 1-channel output "
                              "block, which GroupNorm's 8 groups cannot split; set "
                              "norm = \"instance\" or unet-res-units = 0")
        if config.task is Task.CXR_CLASSIFY and not config.labels:
            raise ConfigError("labels must name at least one labels.csv column, e.g. "
                              "'label_covid,label_no_finding'")
        if not 0 < config.threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {config.threshold}")
        if not 0 < config.val_fraction < 1:
            raise ConfigError(f"val-fraction must be in (0, 1), got {config.val_fraction}")
        if config.image_size % 8:
            raise ConfigError(f"image-size must be a multiple of 8, got {config.image_size}")
        if config.secagg.enabled and config.update_dtype is not UpdateDType.FLOAT32:
            raise ConfigError(
                f"update-dtype={config.update_dtype.value} has no effect under secure "
                "aggregation (its masked vectors are integers); keep float32, or set "
                "secagg-enabled=false")
        _check_strategy(config)
        if config.secagg.enabled and config.min_sites < config.secagg.min_sites:
            if not config.secagg.allow_fewer_sites:
                raise ConfigError(
                    f"secure aggregation with min-sites={config.min_sites} protects nothing: "
                    f"with fewer than {config.secagg.min_sites} sites a site can infer "
                    "another's update. Raise min-sites, or set secagg-allow-fewer-sites=true "
                    "to accept this."
                )
        return config

    def should_evaluate(self, server_round: int) -> bool:
        """Federated evaluation every `evaluate-every` rounds, and after the last."""
        return server_round % self.faults.evaluate_every == 0 or \
            server_round == self.num_rounds

    def to_mapping(self) -> dict[str, Any]:
        """The flat form (for the run folder and `--run-config`)."""
        out: dict[str, Any] = {}
        for key, attr in _FLAT.items():
            value: Any = self
            for part in attr:
                value = getattr(value, part)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, tuple):
                value = ",".join(str(item) for item in value)
            out[key] = "auto" if value is None else value
        return out


def _check_distributed_dp(config: RunConfig) -> None:
    """dp-mode=distributed is sound only as client.distributed_dp describes it."""
    if config.dp.mode is not DPMode.DISTRIBUTED:
        return
    why = "dp-mode=distributed"
    if not config.dp.enabled:
        raise ConfigError(f"{why} needs dp-enabled=true")
    if not config.secagg.enabled:
        raise ConfigError(f"{why} relies on secure aggregation to add the sites' noise "
                          "shares before anyone sees an update; set secagg-enabled=true or "
                          "dp-mode=\"local\"")
    if config.central_dp.enabled:
        raise ConfigError(f"{why} and central-dp-enabled both noise the sum; choose one")
    if config.local_epochs != 1:
        raise ConfigError(f"{why} sends one noisy gradient per round, taken at the global "
                          f"weights; set local-epochs = 1 (got {config.local_epochs})")
    if config.optimizer_state is not OptimizerState.FRESH:
        raise ConfigError(f"{why} takes no local optimiser steps, so there are no moments "
                          "to keep; set optimizer-state = \"fresh\" (use strategy = "
                          "\"fedadam\" for server-side moments)")


def _check_strategy(config: RunConfig) -> None:
    """Combinations that would silently protect or aggregate less than asked."""
    name = config.strategy.name
    if config.faults.min_train_sites > config.min_sites:
        raise ConfigError(f"min-train-sites ({config.faults.min_train_sites}) must be <= "
                          f"min-sites ({config.min_sites}): a round cannot wait for more "
                          "sites than the run starts with")
    if name.needs_individual_updates and config.secagg.enabled:
        raise ConfigError(
            f"strategy={name.value} needs each site's own update, which secure "
            "aggregation hides from the server; use fedavg, fedprox or fedadam, or set "
            "secagg-enabled=false and accept that the server sees individual updates")
    if name.needs_individual_updates and config.central_dp.enabled:
        raise ConfigError(
            f"strategy={name.value} does not average, so central DP's noise (calibrated for a "
            "mean) would not cover it; use fedavg, fedprox or fedadam with central-dp-enabled")
    if config.faults.cross_site and config.secagg.enabled:
        raise ConfigError(
            "cross-site-validation sends each site's local model to the other sites, and "
            "secure aggregation exists to hide it; set secagg-enabled=false to allow it")
    if config.faults.cross_site and not config.dp.enabled:
        raise ConfigError(
            "cross-site-validation without DP would hand each site's local model, trained "
            "on its patients without a privacy guarantee, to the other sites; set "
            "dp-enabled=true")
    if config.faults.max_update_norm > 0 and config.secagg.enabled:
        raise ConfigError(
            "max-update-norm needs each site's own update, which secure aggregation "
            "hides (it bounds updates with secagg-clipping-range instead); set max-update-norm = 0 "
            "or secagg-enabled=false")
    if config.faults.max_in_flight and config.secagg.enabled:
        raise ConfigError(
            "max-sites-in-flight sends training requests a few at a time, and secure "
            "aggregation needs every site of the set in the same exchange; set "
            "max-sites-in-flight = 0 or secagg-enabled=false")
    _check_distributed_dp(config)
    if name is Strategy.KRUM:
        # Krum scores an update by its n-f-2 nearest others: at least one must remain.
        # (Its worst-case guarantee of Blanchard et al. needs n >= 2f+3.)
        needed = config.strategy.krum_byzantine + 3
        if config.faults.min_train_sites < needed:
            raise ConfigError(
                f"krum with krum-byzantine={config.strategy.krum_byzantine} needs at least "
                f"{needed} updates per round (f+3); raise min-train-sites to {needed} or "
                "lower krum-byzantine")


# Flat key -> attribute path. Adding a setting means adding it here and above.
_FLAT: dict[str, tuple[str, ...]] = {
    "task": ("task",),
    "model": ("model",),
    "unet-res-units": ("res_units",),
    "norm": ("norm",),
    "labels": ("labels",),
    "threshold": ("threshold",),
    "init-weights": ("init_weights",),
    "resume-from": ("resume_from",),
    "foreground": ("foreground",),
    "num-rounds": ("num_rounds",),
    "min-sites": ("min_sites",),
    "local-epochs": ("local_epochs",),
    "batch-size": ("batch_size",),
    "learning-rate": ("learning_rate",),
    "optimizer": ("optimizer",),
    "optimizer-state": ("optimizer_state",),
    "early-stop-patience": ("early_stop_patience",),
    "image-size": ("image_size",),
    "voi-window": ("voi_window",),
    "augment": ("augment", "enabled"),
    "augment-probability": ("augment", "probability"),
    "augment-rotation": ("augment", "rotation"),
    "augment-scale": ("augment", "scale"),
    "augment-shift": ("augment", "shift"),
    "augment-intensity": ("augment", "intensity"),
    "val-fraction": ("val_fraction",),
    "seed": ("seed",),
    "round-timeout": ("round_timeout",),
    "update-dtype": ("update_dtype",),
    "strategy": ("strategy", "name"),
    "proximal-mu": ("strategy", "proximal_mu"),
    "server-learning-rate": ("strategy", "server_learning_rate"),
    "trim-fraction": ("strategy", "trim_fraction"),
    "krum-byzantine": ("strategy", "krum_byzantine"),
    "min-train-sites": ("faults", "min_train_sites"),
    "max-update-norm": ("faults", "max_update_norm"),
    "evaluate-every": ("faults", "evaluate_every"),
    "cross-site-validation": ("faults", "cross_site"),
    "max-sites-in-flight": ("faults", "max_in_flight"),
    "dp-enabled": ("dp", "enabled"),
    "dp-target-epsilon": ("dp", "target_epsilon"),
    "dp-delta": ("dp", "delta"),
    "dp-max-grad-norm": ("dp", "max_grad_norm"),
    "dp-trainable": ("dp", "trainable"),
    "dp-mode": ("dp", "mode"),
    "dp-sample-rate": ("dp", "sample_rate"),
    "central-dp-enabled": ("central_dp", "enabled"),
    "central-dp-noise-multiplier": ("central_dp", "noise_multiplier"),
    "central-dp-clipping-norm": ("central_dp", "clipping_norm"),
    "central-dp-delta": ("central_dp", "delta"),
    "secagg-enabled": ("secagg", "enabled"),
    "secagg-min-sites": ("secagg", "min_sites"),
    "secagg-allow-fewer-sites": ("secagg", "allow_fewer_sites"),
    "secagg-clipping-range": ("secagg", "clipping_range"),
    "secagg-quantization-range": ("secagg", "quantization_range"),
    "secagg-max-weight": ("secagg", "max_weight"),
}

_DEFAULTS: dict[str, Any] = {
    "task": "lung-seg",
    "model": "unet",
    "unet-res-units": 0,
    "norm": "group",
    "labels": "label_covid,label_no_finding",
    "threshold": 0.5,
    "init-weights": "",
    "resume-from": "",
    "foreground": "1",
    "num-rounds": 3,
    "min-sites": 3,
    "local-epochs": 1,
    "batch-size": 8,
    "learning-rate": 0.003,
    "optimizer": "adam",
    "optimizer-state": "fresh",
    "early-stop-patience": 0,
    "image-size": 64,
    "voi-window": False,
    "augment": True,
    "augment-probability": 0.8,
    "augment-rotation": 5.0,
    "augment-scale": 0.05,
    "augment-shift": 0.05,
    "augment-intensity": "mild",
    "val-fraction": 0.25,
    "seed": 42,
    "round-timeout": 900.0,
    "update-dtype": "float32",
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "server-learning-rate": 0.01,
    "trim-fraction": 0.2,
    "krum-byzantine": 1,
    "min-train-sites": 2,
    "max-update-norm": 0.0,
    "evaluate-every": 1,
    "cross-site-validation": False,
    "max-sites-in-flight": 0,
    "dp-enabled": True,
    "dp-target-epsilon": 8.0,
    "dp-delta": "auto",
    "dp-max-grad-norm": 1.0,
    "dp-trainable": "all",
    "dp-mode": "local",
    "dp-sample-rate": 1.0,
    "central-dp-enabled": False,
    "central-dp-noise-multiplier": 1.0,
    "central-dp-clipping-norm": 1.0,
    "central-dp-delta": 1e-5,
    "secagg-enabled": True,
    "secagg-min-sites": 3,
    "secagg-allow-fewer-sites": False,
    "secagg-clipping-range": 8.0,
    "secagg-quantization-range": 2**22,
    "secagg-max-weight": 1000.0,
}

if set(_FLAT) != set(_DEFAULTS) or {f.name for f in fields(RunConfig)} != {
    path[0] for path in _FLAT.values()
}:
    raise RuntimeError("common.config: _FLAT, _DEFAULTS and RunConfig disagree")


def default_run_config() -> dict[str, Any]:
    """The defaults, flat (what pyproject.toml's [tool.flwr.app.config] holds)."""
    return dict(_DEFAULTS)


class _Getter:
    """Typed reads of one flat mapping, with errors that name the key."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def _raw(self, key: str) -> Any:
        return self._values[key]

    def boolean(self, key: str) -> bool:
        value = self._raw(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value

    def integer(self, key: str, *, minimum: int) -> int:
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value}")
        return value

    def number(self, key: str) -> float:
        value = self._raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)

    def text(self, key: str) -> str:
        value = self._raw(key)
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value

    def names(self, key: str) -> tuple[str, ...]:
        """A comma-separated list of column names."""
        items = tuple(item.strip() for item in self.text(key).split(",") if item.strip())
        bad = [item for item in items if not item.replace("_", "").replace("-", "").isalnum()]
        if bad or len(set(items)) != len(items):
            raise ConfigError(f"{key} must be distinct comma-separated column names, "
                              f"got {self._raw(key)!r}")
        return items

    def integers(self, key: str) -> tuple[int, ...]:
        """A comma-separated list of integers >= 1, e.g. "5" or "2,3"."""
        try:
            items = tuple(int(item) for item in self.text(key).split(",") if item.strip())
        except ValueError:
            items = ()
        if not items or min(items) < 1:
            raise ConfigError(f"{key} must be comma-separated integers >= 1, "
                              f"got {self._raw(key)!r}")
        return items

    def positive(self, key: str) -> float:
        value = self.number(key)
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
        return value

    def choice(self, key: str, kind: type[enum.Enum]) -> Any:
        value = self._raw(key)
        allowed = [member.value for member in kind]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
        return kind(value)
