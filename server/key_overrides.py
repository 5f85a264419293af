"""The keys file (`--keys-file`): per-API-key overrides of the server's per-key limits.

    {
      "keys": {
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08": {
          "name": "team-a", "rate_limit": 120, "search_budget_per_day": 1000
        },
        "sk-batch-key": {"name": "batch", "search_budget_per_day": 0}
      }
    }

An entry names its key by the SHA-256 of the key (`sha256:` and 64 hex digits, what
`printf %s KEY | sha256sum` prints), so that the file can live in a ConfigMap without
holding a secret, or by the key itself. The file only adjusts limits: which keys are
accepted stays `--api-key`'s, and an entry for a key that is not accepted does nothing.
In an entry, a field left out takes the server's default (`--rate-limit`,
`--search-budget-per-day`), `null` means unlimited for that key, and `name` is what logs
and `GET /v1/search_budget` call the key instead of a digest prefix.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")


class _Default(enum.Enum):
    DEFAULT = "default"


# An entry that leaves a limit out: the server's default applies.
DEFAULT: Final = _Default.DEFAULT


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[\w.@:+-]+$")
    rate_limit: float | None = Field(None, gt=0, allow_inf_nan=False)
    search_budget_per_day: int | None = Field(None, ge=0)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[str, _Entry]


@dataclass(frozen=True, slots=True)
class KeyOverride:
    """One key's overrides: a limit is `DEFAULT` where the server's applies, None unlimited."""

    name: str | None = None
    rate_limit: float | _Default | None = DEFAULT
    search_budget_per_day: int | _Default | None = DEFAULT

    def rate_limit_or(self, default: float | None) -> float | None:
        return default if isinstance(self.rate_limit, _Default) else self.rate_limit

    def budget_or(self, default: int | None) -> int | None:
        value = self.search_budget_per_day
        return default if isinstance(value, _Default) else value


@dataclass(frozen=True)
class KeyOverrides:
    """Overrides by the SHA-256 digest of the key (what the auth layer leaves in a request)."""

    by_digest: dict[bytes, KeyOverride] = field(default_factory=dict)

    def get(self, digest: bytes) -> KeyOverride:
        return self.by_digest.get(digest) or KeyOverride()

    def any_rate_limit(self) -> bool:
        return any(not isinstance(o.rate_limit, _Default) for o in self.by_digest.values())

    def label(self, digest: bytes) -> str:
        """How logs name a key: its `name`, else the first 12 hex digits of its digest."""
        return self.get(digest).name or f"sha256:{digest.hex()[:12]}"


def key_digest_of(entry_key: str) -> bytes:
    """The digest an entry names: `sha256:HEX` as written, anything else is the key itself."""
    match = _DIGEST.fullmatch(entry_key)
    if match:
        return bytes.fromhex(match.group(1))
    if not entry_key.strip():
        raise ValueError("an empty key")
    return hashlib.sha256(entry_key.encode()).digest()


def parse_key_overrides(text: str, source: str = "the keys file") -> KeyOverrides:
    """The overrides of a keys file's text; ValueError naming what is wrong (never the key)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        # Position only: the text around it may be a key.
        raise ValueError(f"{source} is not JSON (line {exc.lineno}, column {exc.colno})") from None
    try:
        parsed = _File.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            # The location's first part is an entry's key, which may be a secret: numbered instead.
            f"{_where(error['loc'], raw)}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(f"{source}: {problems}") from None
    by_digest: dict[bytes, KeyOverride] = {}
    for number, (entry_key, entry) in enumerate(parsed.keys.items(), start=1):
        try:
            digest = key_digest_of(entry_key)
        except ValueError as exc:
            raise ValueError(f"{source}: entry {number}: {exc}") from None
        if digest in by_digest:
            raise ValueError(f"{source}: entry {number} names a key an earlier entry names")
        given = entry.model_fields_set
        by_digest[digest] = KeyOverride(
            name=entry.name,
            rate_limit=entry.rate_limit if "rate_limit" in given else DEFAULT,
            search_budget_per_day=entry.search_budget_per_day
            if "search_budget_per_day" in given
            else DEFAULT,
        )
    return KeyOverrides(by_digest)


def _where(loc: tuple[Any, ...], raw: Any) -> str:
    if len(loc) >= 2 and loc[0] == "keys" and isinstance(raw, dict) and isinstance(raw.get("keys"), dict):
        names = list(raw["keys"])
        number = names.index(loc[1]) + 1 if loc[1] in names else "?"
        return ".".join([f"entry {number}", *(str(p) for p in loc[2:])])
    return ".".join(str(p) for p in loc) or "the file"


def load_key_overrides(path: Path | None) -> KeyOverrides:
    """The overrides of `--keys-file` (none without one)."""
    if path is None:
        return KeyOverrides()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--keys-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--keys-file {path} is not UTF-8 text") from None
    return parse_key_overrides(text, f"--keys-file {path}")
