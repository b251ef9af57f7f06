"""What a site may say when it does not deliver: fixed, sanitised reasons only."""

from __future__ import annotations

from common.keys import (
    ERROR_BUDGET_REFUSED,
    ERROR_MODEL_REFUSED,
    ERROR_POLICY_REFUSED,
    ERROR_REKEY,
    ERROR_SITE_FAILED,
    REASON_BUDGET_REFUSED,
    REASON_MODEL_REFUSED,
    REASON_POLICY_REFUSED,
    REASON_REKEY,
    REASON_SITE_FAILED,
)


class SiteRefusal(RuntimeError):
    """The site declines this round; `code` and `reason` are safe to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def budget_refusal() -> SiteRefusal:
    return SiteRefusal(ERROR_BUDGET_REFUSED, REASON_BUDGET_REFUSED)


def model_refusal() -> SiteRefusal:
    return SiteRefusal(ERROR_MODEL_REFUSED, REASON_MODEL_REFUSED)


def site_failure() -> SiteRefusal:
    return SiteRefusal(ERROR_SITE_FAILED, REASON_SITE_FAILED)


def policy_refusal(policy_keys: list[str]) -> SiteRefusal:
    """Refused by the site's own policy; the reason names only policy keys (a fixed set)."""
    return SiteRefusal(ERROR_POLICY_REFUSED, f"{REASON_POLICY_REFUSED}: {', '.join(policy_keys)}")


def rekey_refusal() -> SiteRefusal:
    """The roster lacks this site's key for the run (e.g. its work folder is new)."""
    return SiteRefusal(ERROR_REKEY, REASON_REKEY)
