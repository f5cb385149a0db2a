"""The `actorbroker` command."""
import argparse
import sys

from actorbroker.scripts.scenario import add_scenario_command
from actorbroker.scripts.bench import add_bench_command
from actorbroker.scripts.serve import add_serve_command


def build_parser():
    parser = argparse.ArgumentParser(prog="actorbroker", description="actorbroker: pub/sub on actors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve_command(sub)
    add_bench_command(sub)
    add_scenario_command(sub)
    try:
        from actorbroker.scripts.client_commands import add_client_commands
        add_client_commands(sub)
    except ImportError:
        pass
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
