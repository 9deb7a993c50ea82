"""``ws-gateway`` / ``python -m gateway``: flags and environment to Config, then run.

Bad configuration prints one line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from .config import SETTINGS, Config, ConfigError, Setting

EXIT_CONFIG = 2


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit code 2 (the project's commands all do this)."""

    def error(self, message: str) -> NoReturn:  # argparse would print usage too
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


def build_parser(settings: tuple[Setting, ...] = SETTINGS, prog: str = "ws-gateway",
                 description: str = "Stream trades from Redis pub/sub (PSUBSCRIBE <prefix>*) "
                                    "to WebSocket clients.") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description=description,
        epilog="Each flag overrides its environment variable; both override the default.",
    )
    for s in settings:
        parser.add_argument(s.flag, dest=s.field, metavar=s.env, default=None,
                            help=f"{s.help} [env {s.env}, default {s.default}]")
    return parser


def load_config(argv: list[str] | None = None, env=None) -> Config:
    args = build_parser().parse_args(argv)
    config = Config.from_sources(os.environ if env is None else env, vars(args))
    config.ssl_context()  # a bad certificate is a configuration error, caught here
    return config


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # picows logs every connect and disconnect at INFO, and every client
    # protocol error at ERROR: any client could fill the logs. The gateway
    # counts and logs what matters itself; picows speaks at DEBUG only.
    if logging.getLevelName(level) > logging.DEBUG:
        logging.getLogger("picows").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"ws-gateway: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    if config.workers > 1:
        from .supervisor import run as supervise
        return supervise(config.workers, sys.argv[1:] if argv is None else argv, config.host, config.port)
    from .server import run  # imported late: --help and config errors stay fast
    return run(config)


if __name__ == "__main__":
    raise SystemExit(main())
