"""`python -m deploy.local up | down | status [service ...]`: the local stack from the shell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.local import stack
from deploy.local._common import ServiceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("services", nargs="*", help="postgres, kafka, mongo (default: all)")
    parser.add_argument("--root", type=Path, default=stack.DEFAULT_ROOT, help="state directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            stack.up(args.root, args.services)
            _print_status(args.root)
            print(f"settings written to {stack.env_path(args.root)}")
        elif args.command == "down":
            stack.down(args.root, args.services)
            print("local stack stopped")
        elif args.command == "status":
            return 0 if _print_status(args.root) else 3
        else:
            for key, value in stack.read_env(args.root).items():
                print(f"{key}={value}")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_status(root: Path) -> bool:
    everything_runs = True
    for name, text in stack.status(root).items():
        everything_runs &= text is not None
        print(f"{name:9} {text or 'not running'}")
    return everything_runs


if __name__ == "__main__":
    sys.exit(main())
