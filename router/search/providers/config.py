"""Configuration of the providers: string options, and keys read from env or a secrets file.

Options arrive as ``Mapping[str, str]`` (from a CLI flag or a settings file), so each backend
parses its own with ``Options``, which also rejects names it does not know: a typo such as
``timout=2`` fails at startup instead of silently keeping the default.

Keys are passed separately as ``secrets`` (env-variable name -> value), never as options, so
that options can be logged and shown while secrets cannot. Error messages name the variable,
never its value.
"""

from __future__ import annotations

import json
import logging
import math
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from router.search.providers.http import HttpSettings

logger = logging.getLogger(__name__)

# The variables ``load_secrets`` reads from the environment.
SECRET_ENV_NAMES: tuple[str, ...] = (
    "SERPER_API_KEY",
    "TAVILY_API_KEY",
    "BRAVE_API_KEY",
    "EXA_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_CSE_ID",
)

# Options every HTTP backend accepts.
COMMON_HTTP_OPTIONS: frozenset[str] = frozenset(
    {
        "name",
        "base_url",
        "timeout",
        "connect_timeout",
        "max_connections",
        "max_body_bytes",
        "max_text_chars",
        "user_agent",
    }
)


class Options:
    """Typed access to one backend's string options; ValueError for unknown or bad ones."""

    def __init__(self, backend: str, options: Mapping[str, str], allowed: Iterable[str]) -> None:
        self.backend = backend
        self._options = dict(options)
        allowed = set(allowed)
        unknown = sorted(set(self._options) - allowed)
        if unknown:
            raise ValueError(
                f"search backend {backend!r}: unknown option(s) {', '.join(unknown)} "
                f"(accepted: {', '.join(sorted(allowed))})"
            )

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self._options.get(key)
        if value is None or not value.strip():
            return default
        return value.strip()

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise ValueError(f"search backend {self.backend!r} needs the option {key!r}")
        return value

    def get_float(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"search backend {self.backend!r}: {key} must be a number") from None
        if not math.isfinite(value) or value <= minimum:
            raise ValueError(f"search backend {self.backend!r}: {key} must be > {minimum:g}")
        return value

    def get_int(self, key: str, default: int, *, minimum: int = 1) -> int:
        raw = self.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"search backend {self.backend!r}: {key} must be an integer") from None
        if value < minimum:
            raise ValueError(f"search backend {self.backend!r}: {key} must be >= {minimum}")
        return value

    def get_list(self, key: str) -> list[str]:
        """A comma-separated option, blanks dropped."""
        raw = self.get(key) or ""
        return [part.strip() for part in raw.split(",") if part.strip()]

    def http_settings(self, defaults: HttpSettings | None = None) -> HttpSettings:
        d = defaults or HttpSettings()
        return HttpSettings(
            timeout=self.get_float("timeout", d.timeout),
            connect_timeout=self.get_float("connect_timeout", d.connect_timeout),
            max_connections=self.get_int("max_connections", d.max_connections),
            max_body_bytes=self.get_int("max_body_bytes", d.max_body_bytes),
            max_text_chars=self.get_int("max_text_chars", d.max_text_chars),
            user_agent=self.get("user_agent", d.user_agent) or d.user_agent,
        )


def require_secret(secrets: Mapping[str, str], env_name: str, backend: str) -> str:
    """The key ``env_name`` from ``secrets``; ValueError naming the variable when it is absent."""
    value = (secrets.get(env_name) or "").strip()
    if not value:
        raise ValueError(
            f"search backend {backend!r} needs {env_name}: set that environment variable "
            "or add it to the secrets file"
        )
    # A newline or other control character would be refused deep inside h11 with an error that
    # quotes the header; refuse it here with one that does not.
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{env_name} contains control characters")
    return value


def _parse_dotenv(text: str, path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; ``#`` comment lines, blank lines and an ``export`` prefix allowed.

    A value may be wrapped in matching single or double quotes. No inline comments and no
    variable expansion: a key may legitimately contain ``#`` or ``$``.
    """
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            # The line number only: the line itself may be a key pasted without its name.
            raise ValueError(f"{path}:{lineno}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _parse_json_secrets(text: str, path: Path) -> dict[str, str]:
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        # ValueError, not TypeError: like every other bad-configuration case of load_secrets.
        raise ValueError(f"{path}: expected a JSON object of NAME: value")
    for key, value in data.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: the value of {key!r} must be a string")
    return dict(data)


def load_secrets(
    env: Mapping[str, str],
    secrets_file: Path | None = None,
    *,
    extra_names: Iterable[str] = (),
) -> dict[str, str]:
    """Provider keys by variable name: the secrets file, overridden by the environment.

    The file is JSON (an object) when it starts with ``{``, otherwise dotenv-like ``KEY=VALUE``
    lines; all its entries are kept (third-party backends may need their own). From ``env``
    only ``SECRET_ENV_NAMES`` and ``extra_names`` are read, and empty values are ignored so
    that an exported-but-empty variable does not mask the file.
    """
    secrets: dict[str, str] = {}
    if secrets_file is not None:
        path = Path(secrets_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ValueError(f"secrets file not found: {path}") from None
        except OSError as exc:
            raise ValueError(f"cannot read secrets file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("secrets file %s is readable by other users; chmod 600 it", path)
        if text.lstrip().startswith("{"):
            secrets.update(_parse_json_secrets(text, path))
        else:
            secrets.update(_parse_dotenv(text, path))
    for name in (*SECRET_ENV_NAMES, *extra_names):
        value = env.get(name, "").strip()
        if value:
            secrets[name] = value
    return secrets
