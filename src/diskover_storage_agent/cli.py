"""``diskover-storage-agent``: the agent's command line (options as in the 2019 original)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
from typing import Optional

from . import __version__
from .config import (
    DEFAULT_LISTEN,
    DEFAULT_MAXCONNECTIONS,
    DEFAULT_PORT,
    TOKEN_ENV,
    AgentConfig,
    ConfigError,
    make_export,
    read_token_file,
    tls_context,
)
from .server import serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskover-storage-agent",
        description="Serve directory listings of this storage node over HTTP.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-l", "--listen", default=DEFAULT_LISTEN,
                   help=f"IP address to listen on, IPv4 or IPv6 (default: {DEFAULT_LISTEN})")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default: {DEFAULT_PORT})")
    p.add_argument("-c", "--maxconnections", type=int, default=DEFAULT_MAXCONNECTIONS,
                   help="most listings served at once; more wait in line "
                        f"(default: {DEFAULT_MAXCONNECTIONS})")
    p.add_argument("-r", "--replacepath", nargs=2, action="append", metavar=("REMOTE", "LOCAL"),
                   required=True,
                   help="export LOCAL directory as REMOTE path, e.g. -r /mnt/isilon /ifs/data "
                        "(repeat for more exports)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more output: -v logs every request, -vv debug")
    sec = p.add_argument_group("security")
    sec.add_argument("--token-file", metavar="FILE",
                     help=f"require 'Authorization: Bearer TOKEN' with the token in FILE "
                          f"(or in the {TOKEN_ENV} environment variable)")
    sec.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM, with its chain)")
    sec.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose >= 2 else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        token = read_token_file(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV) or None
        config = AgentConfig(
            exports=[make_export(remote, local) for remote, local in args.replacepath],
            listen=args.listen, port=args.port, maxconnections=args.maxconnections,
            verbose=args.verbose, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key,
        )
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
    try:
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
