from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType

from client.app import sanitising_mod
from client.errors import budget_refusal
from common import keys
from common.phi import PHIGuard, PHILeakError

GUARD = PHIGuard(["SMITH^JOHN^ZZCANARY", "CANARY-A0001", "ZZCANARY", "ACC1234567", "F"])


def test_clean_record_passes() -> None:
    GUARD.check_record_dict(RecordDict({
        keys.UPDATE: ArrayRecord([np.zeros(3, np.float32)]),
        keys.METRICS: MetricRecord({keys.EVAL_DICE: 0.8, keys.NUM_EXAMPLES: 12.0}),
        keys.SITE: ConfigRecord({keys.SITE_ID: "hospital-a", keys.STATUS: keys.STATUS_OK}),
    }))


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (MetricRecord({"dice-of-CANARY-A0001": 1.0}), "contains a patient identifier"),
        (MetricRecord({"patient-age": 61.0}), r"outside the allow-list: \['patient-age'\]"),
        (ConfigRecord({"site-id": "ward of zzcanary"}), "contains a patient identifier"),
        (ConfigRecord({"note": ["ok", "acc1234567"]}), "contains a patient identifier"),
        (ConfigRecord({"blob": b"\x00\x01"}), "raw bytes"),
    ],
)
def test_identifiers_and_unknown_metrics_are_refused(record, match) -> None:
    with pytest.raises(PHILeakError, match=match):
        GUARD.check_record_dict(RecordDict({"fedrad.x": record}))


def test_short_values_do_not_block_everything() -> None:
    assert len(GUARD) == 4  # "F" (sex) is too short to match safely and is ignored
    GUARD.check_text("fine text", "x")


@pytest.fixture(autouse=True)
def _identity(task_identity):
    yield


def _message() -> Message:
    return Message(RecordDict({keys.ROUND: ConfigRecord({keys.SERVER_ROUND: 1})}),
                   dst_node_id=1, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_errors_leave_the_site_sanitised() -> None:
    def leaky(msg: Message, ctx: Context) -> Message:
        raise ValueError("cannot read /data/CANARY-A0001/IM0001.dcm of SMITH^JOHN^ZZCANARY")

    reply = sanitising_mod(_message(), _context(), leaky)
    assert reply.has_error()
    assert reply.error.code == keys.ERROR_SITE_FAILED
    assert reply.error.reason == keys.REASON_SITE_FAILED
    assert "CANARY" not in reply.error.reason


def test_refusals_keep_their_code() -> None:
    def refusing(msg: Message, ctx: Context) -> Message:
        raise budget_refusal()

    reply = sanitising_mod(_message(), _context(), refusing)
    assert reply.error.code == keys.ERROR_BUDGET_REFUSED
    assert reply.error.reason == keys.REASON_BUDGET_REFUSED


def test_identifiers_nested_in_sequences_and_burned_in_images_are_handled(cxr_root,
                                                                          tmp_path) -> None:
    """The guard's identifiers come from PS3.15's identifying attributes at any depth
    (before: 11 top-level fields), and an image whose pixels may show identifiers
    (BurnedInAnnotation = YES) is not used."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from client.dicom_scan import examine

    source = next((cxr_root / "radiopaedia").rglob("IM*.dcm"))
    ds = pydicom.dcmread(source)
    request = Dataset()
    request.RequestingPhysician = "QUILLBY^ZENOBIA"
    inner = Dataset()
    inner.OperatorsName = "VANTERPOOL^OSWIN"
    request.ReferencedStudySequence = Sequence([inner])
    ds.RequestAttributesSequence = Sequence([request])
    ds.PatientTelephoneNumbers = "+44 20 7946 0321"
    ds.save_as(tmp_path / "nested.dcm")
    note = examine(tmp_path / "nested.dcm")
    assert note.kind == "image"
    for value in ("QUILLBY^ZENOBIA", "QUILLBY", "ZENOBIA", "VANTERPOOL", "+44 20 7946 0321"):
        assert value in note.phi_values, value
    guard = PHIGuard(note.phi_values)
    with pytest.raises(PHILeakError):
        guard.check_record_dict(RecordDict({"fedrad.x": ConfigRecord({"note": "vanterpool"})}))
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    burned = examine(tmp_path / "burned.dcm")
    assert burned.kind == "skip" and "BurnedInAnnotation" in burned.reason
