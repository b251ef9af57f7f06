"""Names of the records and fields that travel between server and sites.

Defined once here; neither side spells them out itself.
"""

from __future__ import annotations

# Record names in a Message's RecordDict.
WEIGHTS = "fedrad.weights"  # ArrayRecord: the global model (server -> site)
UPDATE = "fedrad.update"  # ArrayRecord: local - global (site -> server)
ROUND = "fedrad.round"  # ConfigRecord: {"server-round": int}
METRICS = "fedrad.metrics"  # MetricRecord: numbers only
SITE = "fedrad.site"  # ConfigRecord: {"site-id": str, "status": str}
MASKING = "fedrad.masking"  # ConfigRecord: the roster and set of a masked round (common.masking)
MASKED = "fedrad.masked"  # ArrayRecord: a site's masked, quantised update (uint32)
ADVERT = "fedrad.advert"  # ConfigRecord: a site's key advert (site -> server)
EVALUATION = "fedrad.evaluation"  # MetricRecord: the previous round's model, evaluated

SERVER_ROUND = "server-round"
MODEL_SIGNATURE = "model-signature"  # Ed25519 over the global model (common.model_signing)
SITE_ID = "site-id"
STATUS = "status"
EVALUATE_ROUND = "evaluate-round"  # a training request: first evaluate (round r's model)
STAGE = "stage"  # a query: "advertise" (the run's key) or "recover" (re-mask, dropout)
STAGE_ADVERTISE = "advertise"
STAGE_RECOVER = "recover"
ATTEMPT = "attempt"  # 0: the round's masks; 1: the one recovery after a dropout

# Site status values (ConfigRecord SITE / STATUS).
STATUS_OK = "ok"
STATUS_REFUSED_BUDGET = "refused-privacy-budget"
STATUS_REFUSED_POLICY = "refused-site-policy"

# Metric names a site may send (anything else is refused by the PHI guard).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
LOAD_SECONDS = "load-seconds"
EPSILON_ROUND = "epsilon-run"
EPSILON_TOTAL = "epsilon-total"
EPSILON_BUDGET = "epsilon-budget"
EPSILON_FLOOR = "epsilon-run-own-noise"  # distributed DP: the run's ε of the site's share alone
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
EVAL_LOSS = "eval-loss"
EVAL_DICE = "eval-dice"
EVAL_HD95 = "eval-hd95"
EVAL_AUROC_MACRO = "eval-auroc-macro"
# Per-label classification metrics: "<prefix>:<label column>" (see label_metric).
EVAL_AUROC = "eval-auroc"
EVAL_SENSITIVITY = "eval-sensitivity"
EVAL_SPECIFICITY = "eval-specificity"
EVAL_SECONDS = "eval-seconds"
UPDATE_NORM = "update-norm"

ALLOWED_METRICS = frozenset(
    {
        NUM_EXAMPLES,
        TRAIN_LOSS,
        TRAIN_SECONDS,
        LOAD_SECONDS,
        EPSILON_ROUND,
        EPSILON_TOTAL,
        EPSILON_BUDGET,
        EPSILON_FLOOR,
        DELTA,
        NOISE_MULTIPLIER,
        EVAL_LOSS,
        EVAL_DICE,
        EVAL_HD95,
        EVAL_AUROC_MACRO,
        EVAL_SECONDS,
        UPDATE_NORM,
    }
)

def headline_metric(task: str) -> str:
    """The metric a task's rounds are judged by (pooled over sites)."""
    return EVAL_AUROC_MACRO if task == "cxr-classify" else EVAL_DICE


_LABEL_PREFIXES = (EVAL_AUROC, EVAL_SENSITIVITY, EVAL_SPECIFICITY)
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def label_metric(prefix: str, label: str) -> str:
    """The wire name of a per-label metric, e.g. "eval-auroc:label_covid"."""
    return f"{prefix}:{label}"


def is_allowed_metric(name: str) -> bool:
    """A fixed metric name, or a per-label one whose label is a plain column name
    (labels come from the run config, never from a site's data)."""
    if name in ALLOWED_METRICS:
        return True
    prefix, _, label = name.partition(":")
    return prefix in _LABEL_PREFIXES and 0 < len(label) <= 64 and set(label) <= _LABEL_CHARS


# Error codes of fedrad's sanitised error replies (Flower's own codes are < 100).
ERROR_SITE_FAILED = 1001
ERROR_BUDGET_REFUSED = 1002
REASON_SITE_FAILED = "fedrad site: the round failed at this site; details are in the site's log"
REASON_BUDGET_REFUSED = "fedrad site: refused to train, its privacy budget would be exceeded"
ERROR_MODEL_REFUSED = 1003
REASON_MODEL_REFUSED = ("fedrad site: refused the global model, its consortium signature is "
                        "missing or does not verify")
ERROR_POLICY_REFUSED = 1004
REASON_POLICY_REFUSED = "fedrad site: refused by the site's policy"  # + ": <policy keys>"
ERROR_REKEY = 1005
REASON_REKEY = ("fedrad site: the roster does not hold this site's key for the run; ask it "
                "to advertise again")
