"""Secrets out of every log record: configured keys and credential-shaped text, masked.

At `--log-level debug`, httpcore logs provider response headers verbatim and httpx logs
request URLs (where some providers take the key as a query parameter); a provider that echoes
the key would put it in the log. `SecretRedactor` masks, in the formatted message (its args
included) and in the exception text:

- every configured secret (the server's API keys, the remote engine's key, the provider keys);
- `Authorization: <scheme> <token>`, `X-API-Key: ...`, `X-Subscription-Token: ...` headers,
  written as text or as httpcore's `(b'Name', b'value')` tuples;
- `api_key=`, `apikey=`, `key=`, `token=`, `access_token=` parameters and JSON fields.

`install_redaction` applies it to every record of every logger, through the record factory,
so handlers added later (uvicorn's, a test's) see only redacted records.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# A configured secret shorter than this is not masked: it would garble the log and is not a
# secret worth the name.
MIN_SECRET_LENGTH = 4

_HEADER_NAMES = r"authorization|proxy-authorization|x-api-key|api-key|x-subscription-token|cookie"
_PATTERNS = (
    # `Authorization: Bearer TOKEN`, `x-api-key: TOKEN`, `'x-api-key': 'TOKEN'`
    re.compile(
        rf"(?i)\b((?:{_HEADER_NAMES})['\"]?\s*[:=]\s*['\"]?)(?:(bearer|basic|token)\s+)?"
        r"[^\s,;'\"\]})]+"
    ),
    # httpcore's `(b'Authorization', b'Bearer TOKEN')`
    re.compile(rf"(?i)(b?['\"](?:{_HEADER_NAMES})['\"],\s*b?['\"])[^'\"]*"),
    # `?api_key=TOKEN`, `&key=TOKEN`, `"api_key": "TOKEN"`
    re.compile(
        r"(?i)((?:[?&;\s]|^|['\"])(?:api[_-]?key|apikey|key|token|access[_-]?token|secret)"
        r"['\"]?\s*[:=]\s*['\"]?)[^&\s'\",;}]+"
    ),
)


class SecretRedactor(logging.Filter):
    """A logging filter that masks secrets in a record in place; it never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        known = set(self.secrets)
        for secret in secrets:
            secret = (secret or "").strip()
            if len(secret) >= MIN_SECRET_LENGTH and secret not in known:
                known.add(secret)
                self.secrets.append(secret)
        # Longest first, so that a key containing another is masked whole.
        self.secrets.sort(key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(_keep_prefix, text)
        return text

    def _redact_arg(self, value: Any) -> Any:
        """One %-argument, masked; its type is kept unless it carried a secret."""
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, int | float):
            return value
        text = str(value)  # bytes and header lists (httpcore) are searched as printed
        redacted = self.redact(text)
        return value if redacted == text else redacted

    def filter(self, record: logging.LogRecord) -> bool:
        # Mask the format string and each argument apart, keeping `args`: formatters such as
        # uvicorn's access log unpack them and fail on a record whose args were dropped.
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact_arg(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: self._redact_arg(v) for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        redacted = self.redact(message)
        if redacted != message:  # a secret seen only once formatted: keep the masked text
            record.msg = redacted
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _keep_prefix(match: re.Match[str]) -> str:
    scheme = match.group(2) if (match.re.groups >= 2 and match.group(2)) else ""
    return match.group(1) + (scheme + " " if scheme else "") + MASK


_installed: SecretRedactor | None = None


def install_redaction(secrets: Iterable[str] = ()) -> SecretRedactor:
    """Redact every log record from now on (idempotent; later calls add secrets)."""
    global _installed
    if _installed is not None:
        _installed.add(secrets)
        return _installed
    redactor = SecretRedactor(secrets)
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redactor.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = redactor
    return redactor


def settings_secrets(settings: Any) -> list[str]:
    """Every secret `ssrl serve` knows of: its API keys, the engine's, the providers'."""
    secrets = [*getattr(settings, "api_key", []), getattr(settings, "engine_api_key", None) or ""]
    try:
        from router.search.providers.config import load_secrets

        secrets += load_secrets(os.environ, getattr(settings, "secrets_file", None)).values()
    except (ImportError, ValueError):
        pass  # an unreadable secrets file is reported where the search backends are built
    return secrets
