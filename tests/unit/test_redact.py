"""Trainer-written text is made safe before it reaches status, Events and terminals
(finetune_operator.reconcile.redact; docs/security.md says what is and is not redacted)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from finetune_operator.api.job import FineTuneJob
from finetune_operator.reconcile import Observed, ObservedJob, decide
from finetune_operator.reconcile.observe import observe_pod
from finetune_operator.reconcile.redact import REDACTED, printable, redact
from tests.manifests import baseline

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HF = "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"
AWS_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6IiJ9.eyJpc3MiOiJrdWJlcm5ldGVzIn0.c2lnbmF0dXJlLXBhcnQ"
ESCAPES = "\x1b[2J\x1b[H\x1b]0;pwned\x07\x1b]52;c;Y3VybCBldmlsLnNo\x07\x9b31m\x1bP+q\x1b\\\u202e\r\x08\x00"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"HTTPError: 401 for token {HF}", HF),
        (f"HF_TOKEN={HF}", HF),
        (f"export AWS_ACCESS_KEY_ID={AWS_ID}", AWS_ID),
        (f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
        (f"AWS_SECRET_ACCESS_KEY: {AWS_SECRET}", AWS_SECRET),
        ("headers={'Authorization': 'Bearer sk-live-0123456789abcdef'}", "sk-live-0123456789abcdef"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ('{"password": "hunter2hunter2", "lr": 0.1}', "hunter2hunter2"),
        ("git clone https://bob:s3cr3tpass@git.example.com/repo", "s3cr3tpass"),
        (f"token file says {JWT}", JWT),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n", "MIIEpAIBAAKCAQEA"),
    ],
)
def test_credentials_are_redacted_by_their_shape(text: str, secret: str) -> None:
    redacted = redact(text)
    assert secret not in redacted
    assert REDACTED in redacted


def test_training_words_are_not_redacted() -> None:
    text = (
        "Token indices sequence length is longer; pad_token=None; loss=0.5 accuracy: 0.91 step 30/100; "
        'Secret: "hf-token" not found; model.tokenSecretRef names key: token'
    )
    assert redact(text) == text


def test_escapes_and_controls_are_stripped_newlines_and_tabs_kept() -> None:
    assert printable(f"a{ESCAPES}b\n\tc") == "ab\n\tc"
    assert "\x1b" not in redact(f"red \x1b[31mtext{ESCAPES}")


def test_an_escape_cannot_split_a_token_to_hide_it() -> None:
    assert HF not in redact(HF[:10] + "\x1b[0m" + HF[10:]).replace("\x1b[0m", "")
    assert REDACTED in redact(HF[:10] + "\x1b[0m" + HF[10:])


def _pod(message: str) -> dict[str, object]:
    terminated = {"exitCode": 1, "reason": "Error", "message": message, "finishedAt": "2026-11-23T12:00:00Z"}
    return {
        "metadata": {"name": "p1"},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]},
    }


@pytest.mark.parametrize(
    "tail",
    [
        # a crash: the log tail itself
        f"Traceback (most recent call last):\n{ESCAPES}requests.get(url, token={HF})\nRuntimeError: 401 {AWS_ID}",
        # the trainer's own error line, quoting what it was given
        json.dumps({"event": "error", "message": f"cannot read model: HF_TOKEN={HF} {ESCAPES}{AWS_ID}"}),
    ],
)
def test_the_log_tail_in_status_and_events_is_redacted(tail: str) -> None:
    """On main the tail went to status.message, the Failed condition and the Warning event as written."""
    manifest = baseline("leaky")
    manifest["metadata"].update({"namespace": "ml", "uid": "uid-1", "generation": 1})
    pod = observe_pod(_pod(tail))
    failed = ObservedJob(failed=1, failed_condition=True, failed_reason="BackoffLimitExceeded")
    decision = decide(FineTuneJob.model_validate(manifest), Observed(job=failed, pods=(pod,)), NOW)
    written = [decision.status.message or "", *(c.message for c in decision.status.conditions)]
    written += [e.message for e in decision.events]
    assert any(REDACTED in text for text in written), written
    for text in written:
        for leak in (HF, AWS_ID, "\x1b", "\x9b", "\x07", "\r"):
            assert leak not in text, (leak, text)
