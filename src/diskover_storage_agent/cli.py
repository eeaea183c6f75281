"""``diskover-storage-agent``: the agent's command line (options as in the 2019 original)."""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import __version__
from .config import (
    DEFAULT_BODY_MEMORY_MIB,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAXCONNECTIONS,
    DEFAULT_PORT,
    DEFAULT_QUEUE,
    DEFAULT_SEND_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    METRICS_DIR_ENV,
    TOKEN_ENV,
    AgentConfig,
    ConfigError,
    make_export,
    read_token_file,
    tls_context,
)
from .workers import cpu_count

# Neither .server nor .observability is imported here: prometheus_client must be imported
# only once METRICS_DIR_ENV says whether the metrics are kept for several processes.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskover-storage-agent",
        description="Serve directory listings of this storage node over HTTP.",
    )
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--config", metavar="FILE",
                   help="read options from this TOML file (keys are the long option names; "
                        "the command line wins)")
    p.add_argument("-l", "--listen", default=DEFAULT_LISTEN,
                   help=f"IP address to listen on, IPv4 or IPv6 (default: {DEFAULT_LISTEN})")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default: {DEFAULT_PORT})")
    p.add_argument("-c", "--maxconnections", type=int, default=DEFAULT_MAXCONNECTIONS,
                   help="most listings served at once; more wait in line "
                        f"(default: {DEFAULT_MAXCONNECTIONS})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE, metavar="N",
                   help="requests that may wait for a listing slot, in each process; more get 503 with "
                        f"Retry-After (default: {DEFAULT_QUEUE})")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="worker processes serving the same port, each with its share of -c (never more "
                        f"processes than -c) (default: the number of CPUs, here {cpu_count()})")
    p.add_argument("-r", "--replacepath", nargs=2, action="append", metavar=("REMOTE", "LOCAL"),
                   help="export LOCAL directory as REMOTE path, e.g. -r /mnt/isilon /ifs/data "
                        "(repeat for more exports; required, here or in --config)")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, answers in flight get this long to finish before they are cut "
                        f"(default: {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more output: -v logs every request, -vv debug")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines as plain text (default) or JSON objects, one per line")
    lim = p.add_argument_group("connection limits (as nginx's)")
    lim.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                     help="a request's header must arrive within this, from its first byte or the "
                          f"connection (nginx's client_header_timeout; default: {DEFAULT_HEADER_TIMEOUT:g})")
    lim.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                     help="a request's whole body must arrive within this after its header "
                          f"(default: {DEFAULT_BODY_TIMEOUT:g})")
    lim.add_argument("--keepalive-timeout", type=float, default=DEFAULT_KEEPALIVE_TIMEOUT, metavar="SECONDS",
                     help=f"an idle connection is closed after this (default: {DEFAULT_KEEPALIVE_TIMEOUT:g})")
    lim.add_argument("--send-timeout", type=float, default=DEFAULT_SEND_TIMEOUT, metavar="SECONDS",
                     help="a client that reads none of its answer for this long is disconnected "
                          f"(default: {DEFAULT_SEND_TIMEOUT:g})")
    lim.add_argument("--body-memory", type=int, default=DEFAULT_BODY_MEMORY_MIB, metavar="MIB",
                     help="request bodies being received, in each process; past it a walk request gets 503 "
                          f"(default: {DEFAULT_BODY_MEMORY_MIB})")
    sec = p.add_argument_group("security")
    sec.add_argument("--token-file", metavar="FILE",
                     help=f"require 'Authorization: Bearer TOKEN' with the token in FILE "
                          f"(or in the {TOKEN_ENV} environment variable)")
    sec.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM, with its chain)")
    sec.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Options from the command line over those of ``--config``."""
    parser = build_parser()
    pre, _ = _pre_parser().parse_known_args(argv)
    from_file: dict[str, Any] = {}
    if pre.config:
        try:
            from_file = load_config_file(pre.config, parser)
        except ConfigError as exc:
            parser.error(str(exc))
    # -r on the command line replaces the file's exports (argparse would append to them).
    exports = from_file.pop("replacepath", None)
    parser.set_defaults(**from_file)
    args = parser.parse_args(argv)
    args.replacepath = args.replacepath or exports
    if not args.replacepath:
        parser.error("the following arguments are required: -r/--replacepath (or replacepath in --config)")
    return args


def _pre_parser() -> argparse.ArgumentParser:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    return pre


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Option defaults from a TOML file whose keys are the long option names."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    known = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version", "config")}
    out: dict[str, Any] = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        action = known.get(dest)
        if action is None:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        if dest == "replacepath":
            if not (isinstance(value, list) and all(
                    isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value)):
                raise ConfigError(f"--config {path}: replacepath must be a list of [REMOTE, LOCAL] pairs")
        elif action.type is int or dest == "verbose":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} must be an integer")
        elif action.type is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key} must be a number")
            value = float(value)
        elif not isinstance(value, str):
            raise ConfigError(f"--config {path}: {key} must be a string")
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"--config {path}: {key} must be one of {', '.join(action.choices)}")
        out[dest] = value
    return out


def make_config(args: argparse.Namespace) -> AgentConfig:
    """The settings the agent runs with, from its parsed options (:class:`ConfigError` when
    they cannot be)."""
    token = read_token_file(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV) or None
    return AgentConfig(
        exports=[make_export(remote, local) for remote, local in args.replacepath],
        listen=args.listen, port=args.port, maxconnections=args.maxconnections, max_queue=args.max_queue,
        verbose=args.verbose, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout, send_timeout=args.send_timeout,
        shutdown_timeout=args.shutdown_timeout, body_memory=args.body_memory * 2**20,
        processes=cpu_count() if args.processes is None else args.processes,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = make_config(args)
        tls_context(config)  # fail now, with a clear message, on a bad certificate or key
    except ConfigError as exc:
        print(f"diskover-storage-agent: error: {exc}", file=sys.stderr)
        return 2
    _raise_open_files_limit()
    try:
        import uvloop  # optional extra: a faster event loop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run

    def logging_on() -> None:
        from .observability import setup_logging

        setup_logging(args.verbose, args.log_format)

    try:
        if config.process_count > 1:
            from . import workers

            return workers.run(config, runner, logging_on)
        os.environ.pop(METRICS_DIR_ENV, None)  # one process: its own metrics, whatever the environment says
        logging_on()
        from .server import serve

        runner(serve(config))
    except OSError as exc:  # e.g. address in use
        print(f"diskover-storage-agent: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _raise_open_files_limit() -> None:
    """Many clients mean many sockets: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
