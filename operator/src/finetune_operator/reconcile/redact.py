"""Text a trainer wrote, made safe to store and to show. Pure.

A trainer's log tail reaches status and Events (``terminationMessagePolicy: FallbackToLogsOnError``),
and from there every terminal that runs ``kubectl describe`` or ``kubectl finetune``. The trainer runs
user code (``trustRemoteCode``), so that text can hold terminal escapes and, by accident or on
purpose, credentials. ``printable`` removes what a terminal would act on; ``redact`` also replaces
credentials recognisable by their shape. The operator cannot read the job's Secrets, so it cannot
redact their values by value: docs/security.md says what is and is not caught.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"

_ESCAPES = re.compile(
    r"""
      (?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]                 # CSI (7- and 8-bit): colours, cursor moves, clears
    | \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?               # OSC: window titles, hyperlinks, clipboard writes
    | \x1b[PX^_][^\x1b]*(?:\x1b\\)?                    # DCS, SOS, PM, APC strings
    | \x1b[ -/]*[0-~]?                                 # other escapes (charsets, keypad modes), lone ESC
    """,
    re.VERBOSE,
)
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""C0 controls but tab and newline, DEL, C1 controls (8-bit CSI included) and the bidirectional
overrides that make a terminal show text in another order than it is stored."""

_VALUE = r"""(?:"[^"\n]*"|'[^'\n]*'|[^\s"',;}]+)"""
_CREDENTIALS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A PEM private key, whole or cut off by the tail.
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:.*?-----END [A-Z ]*PRIVATE KEY-----|.*\Z)", re.S), REDACTED),
    # user:password@ in URLs (git remotes, proxies, object-store endpoints).
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"), REDACTED),
    # Authorization headers (any scheme) and bearer tokens.
    (re.compile(rf"""(?i)(\bauthorization["']?\s*[=:]\s*["']?(?:[A-Za-z-]+ +)?){_VALUE}"""), rf"\1{REDACTED}"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1{REDACTED}"),
    # Assignments to credential-named keys: env style (HF_TOKEN=, AWS_SECRET_ACCESS_KEY:) and config keys.
    (
        re.compile(
            r"""(\b[A-Z][A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)"""
            rf"""[A-Z0-9_]*["']?\s*[=:]\s*){_VALUE}"""
        ),
        rf"\1{REDACTED}",
    ),
    (
        re.compile(
            r"""(?i)(\b(?:aws_secret_access_key|aws_session_token|client_secret|password|passwd|api_?key"""
            rf"""|access_token|auth_token|refresh_token|hf_token)["']?\s*[=:]\s*){_VALUE}"""
        ),
        rf"\1{REDACTED}",
    ),
    # Tokens recognisable by their prefix.
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), REDACTED),  # Hugging Face
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), REDACTED),  # AWS access key ids
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), REDACTED),  # GitHub
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), REDACTED),  # Slack
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), REDACTED),  # JWTs: SA tokens
)


def printable(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (newlines and tabs stay)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def redact(text: str) -> str:
    """``printable(text)`` with credentials recognisable by their shape replaced by ``[REDACTED]``.
    Escapes go first, so that one cannot split a token to hide it."""
    text = printable(text)
    for pattern, replacement in _CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text


def redacted_tail(text: str, limit: int) -> str:
    """The last ``limit`` characters of ``redact(text)``: redacted whole, then cut, so a cut never
    leaves half a token unrecognised."""
    return redact(text).strip()[-limit:]
