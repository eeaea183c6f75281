"""The scanner's settings: ``DISKOVER_AGENT_*`` environment variables over an optional TOML file."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..connection import parse_hosts
from ..protocol import Exclusions
from ..transport import DEFAULT_PORT, read_token_file

DEFAULT_CONFIG = "~/.config/diskover_scandir_agent/config.toml"
DEFAULT_WORKERS = 40
#: Seconds the scanner keeps retrying while no agent answers, before the crawl fails.
DEFAULT_RETRY_FOR = 120.0


class ScannerConfigError(RuntimeError):
    """The scanner's settings are missing or wrong (diskover logs it as ALT SCANNER ERROR)."""



@dataclass(frozen=True)
class Settings:
    """Where the agents are and how to talk to them."""

    hosts: tuple[str, ...]
    port: int = DEFAULT_PORT
    token: Optional[str] = field(default=None, repr=False)
    tls: bool = False
    cafile: Optional[str] = None
    insecure: bool = False
    workers: int = DEFAULT_WORKERS
    retry_for: float = DEFAULT_RETRY_FOR
    exclude_dirs: tuple[str, ...] = ()
    exclude_files: tuple[str, ...] = ()
    one_fs: bool = False
    #: The config file that was read, if any.
    config_file: Optional[str] = None

    def client_options(self) -> dict[str, Any]:
        """Keyword options for ``AgentConnection`` and ``parallel_walk``."""
        return {"token": self.token, "tls": self.tls, "cafile": self.cafile, "verify": not self.insecure}

    @property
    def exclusions(self) -> Exclusions:
        return Exclusions.of(self.exclude_dirs, self.exclude_files, self.one_fs)


#: Each setting's environment variable, by its config file name.
ENV = {
    "hosts": "DISKOVER_AGENT_HOSTS",
    "port": "DISKOVER_AGENT_PORT",
    "token-file": "DISKOVER_AGENT_TOKEN_FILE",
    "tls": "DISKOVER_AGENT_TLS",
    "cafile": "DISKOVER_AGENT_CAFILE",
    "insecure": "DISKOVER_AGENT_INSECURE",
    "workers": "DISKOVER_AGENT_WORKERS",
    "retry-for": "DISKOVER_AGENT_RETRY_FOR",
    "exclude-dirs": "DISKOVER_AGENT_EXCLUDE_DIRS",
    "exclude-files": "DISKOVER_AGENT_EXCLUDE_FILES",
    "one-fs": "DISKOVER_AGENT_ONE_FS",
}
#: The key of :func:`configured`'s answer that names the config file read.
_FILE = "config-file"
_LISTS = ("hosts", "exclude-dirs", "exclude-files")
_BOOLS = ("tls", "insecure", "one-fs")
_INTS = ("port", "workers")
_STRS = ("token-file", "cafile")
_NUMBERS = ("retry-for",)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def configured(environ: Optional[Mapping[str, str]] = None) -> tuple[dict[str, Any], str]:
    """The settings that are set: ``DISKOVER_AGENT_*`` variables over the config file, keyed by
    the config file's names (``port``, ``token-file``...), checked; and the config file's path
    (read if it exists or ``DISKOVER_AGENT_CONFIG`` names it). :class:`ScannerConfigError`
    when one is wrong. An empty environment variable counts as unset. The ``diskover-agent``
    command line reads its defaults here too."""
    env = os.environ if environ is None else environ
    explicit = env.get("DISKOVER_AGENT_CONFIG") or None
    path = os.path.expanduser(explicit or DEFAULT_CONFIG)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}  # where each value came from, for the errors below
    if explicit or os.path.exists(path):
        values = _read_config_file(path)
        where = {key: f"config {path}: {key} = {value!r}" for key, value in values.items()}
        values[_FILE] = path
    for key, name in ENV.items():
        raw = env.get(name)
        if raw:
            values[key] = _from_env(key, name, raw)
            where[key] = f"{name}={raw!r}"
    port = values.get("port", DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ScannerConfigError(f"{where['port']}: the port must be 1 to 65535")
    if values.get("hosts"):
        try:
            parse_hosts(values["hosts"], port)
        except ValueError as exc:
            raise ScannerConfigError(str(exc)) from None
    if values.get("workers", DEFAULT_WORKERS) < 1:
        raise ScannerConfigError(f"{where['workers']}: workers must be at least 1")
    if not values.get("retry-for", DEFAULT_RETRY_FOR) > 0:
        raise ScannerConfigError(f"{where['retry-for']}: retry-for must be more than 0 seconds")
    return values, path


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Settings from the environment over the config file; :class:`ScannerConfigError` when wrong.

    An empty environment variable counts as unset.
    """
    env = os.environ if environ is None else environ
    try:
        values, path = configured(env)
    except ScannerConfigError as exc:  # the shared checks speak for whoever reads the settings
        raise ScannerConfigError(f"diskover agent scanner: {exc}") from None
    config_file = values.pop(_FILE, None)
    hosts = values.get("hosts") or []
    if not hosts:
        raise ScannerConfigError(
            "no diskover storage agents configured: set DISKOVER_AGENT_HOSTS=stornode1,stornode2 "
            f"(comma-separated host[:port]) or hosts = [\"stornode1\", ...] in {path} "
            "(another file: DISKOVER_AGENT_CONFIG)"
        )
    port = values.get("port", DEFAULT_PORT)
    workers = values.get("workers", DEFAULT_WORKERS)
    retry_for = values.get("retry-for", DEFAULT_RETRY_FOR)
    token = env.get("DISKOVER_AGENT_TOKEN") or None
    if token is None and values.get("token-file"):
        token = _read_token(values["token-file"])
    return Settings(
        hosts=tuple(hosts), port=port, token=token, tls=values.get("tls", False), cafile=values.get("cafile"),
        insecure=values.get("insecure", False), workers=workers, retry_for=float(retry_for),
        exclude_dirs=tuple(values.get("exclude-dirs", ())), exclude_files=tuple(values.get("exclude-files", ())),
        one_fs=values.get("one-fs", False), config_file=config_file,
    )


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScannerConfigError(f"config {path}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"config {path}: {key}"
        if key not in ENV:
            raise ScannerConfigError(f"{where}: unknown setting (known: {', '.join(ENV)})")
        if key in _LISTS:
            if isinstance(value, str):
                value = _split(value)
            elif not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ScannerConfigError(f"{where} must be a list of strings")
        elif key in _BOOLS:
            if not isinstance(value, bool):
                raise ScannerConfigError(f"{where} must be true or false")
        elif key in _INTS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ScannerConfigError(f"{where} must be an integer")
        elif key in _NUMBERS:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ScannerConfigError(f"{where} must be a number")
        elif not isinstance(value, str):
            raise ScannerConfigError(f"{where} must be a string")
        out[key] = value
    return out


def _from_env(key: str, name: str, raw: str) -> Any:
    if key in _LISTS:
        return _split(raw)
    if key in _BOOLS:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ScannerConfigError(f"{name}={raw!r}: expected 1 or 0")
    if key in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise ScannerConfigError(f"{name}={raw!r}: expected an integer") from None
    if key in _NUMBERS:
        try:
            return float(raw)
        except ValueError:
            raise ScannerConfigError(f"{name}={raw!r}: expected a number of seconds") from None
    return raw


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _read_token(path: str) -> str:
    try:
        return read_token_file(path)
    except ValueError as exc:
        raise ScannerConfigError(f"diskover agent scanner: {exc}") from None
