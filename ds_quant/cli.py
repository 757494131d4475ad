"""`ds-quant` command line: thin layers over the library."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, QuantConfig


def check_config(args: argparse.Namespace) -> int:
    try:
        QuantConfig.from_json(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-quant", description="FP8 quantization for DeepSpeed AutoTP models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", help="validate a quantization config: prints 'ok' or what to fix")
    p.add_argument("file")
    p.set_defaults(func=check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
