"""The PHI guard: every record a site sends passes `PHIGuard.check_record_dict`.

It fails closed: a metric name outside the allow-list, or any text that holds
one of the identifiers read from the site's own DICOM headers, raises
`PHILeakError` and nothing is sent.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.keys import is_allowed_metric

MIN_IDENTIFIER_LENGTH = 4


class PHILeakError(RuntimeError):
    """Something about to leave the site holds an identifier."""


class PHIGuard:
    """Refuses outgoing text that contains any of the site's identifiers."""

    def __init__(self, identifiers: Iterable[str]) -> None:
        cleaned = {i.strip().lower() for i in identifiers}
        self._identifiers = frozenset(i for i in cleaned if len(i) >= MIN_IDENTIFIER_LENGTH)

    def __len__(self) -> int:
        return len(self._identifiers)

    def check_text(self, text: str, where: str) -> None:
        """Raise if `text` contains an identifier (the identifier is not repeated)."""
        lowered = text.lower()
        for identifier in self._identifiers:
            if identifier in lowered:
                raise PHILeakError(f"refused to send {where}: it contains a patient identifier")

    def check_record_dict(self, content: RecordDict) -> None:
        """Check every record name, key and text value of an outgoing message."""
        for name, record in content.items():
            self.check_text(name, "a record name")
            if isinstance(record, MetricRecord):
                for key in record:
                    self.check_text(key, f"metric name in {name}")
                extra = sorted(k for k in record if not is_allowed_metric(k))
                if extra:
                    raise PHILeakError(f"refused to send metrics outside the allow-list: {extra}")
            elif isinstance(record, ConfigRecord):
                for key, value in record.items():
                    self.check_text(key, f"config key in {name}")
                    values = value if isinstance(value, list) else [value]
                    for item in values:
                        if isinstance(item, str):
                            self.check_text(item, f"config value {name}.{key}")
                        elif isinstance(item, bytes):
                            raise PHILeakError(f"refused to send raw bytes in {name}.{key}")
            elif isinstance(record, ArrayRecord):
                for key in record:
                    self.check_text(key, f"array name in {name}")
