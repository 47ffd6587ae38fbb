"""Convert an LCKV checkpoint directory between the original code's two formats, where the semantics allow.

    python -m tools.convert SRC DST --to {opt-llama,lckv-llama}

The command line of ``models.convert.convert_checkpoint``; its module docstring says what converts and what not.
"""

import sys

from models.convert import FORMATS, convert_checkpoint

from .cli import ArgumentParser, UsageError, run_cli
from .training_checkpoints import check_save_finished

PROG = "python -m tools.convert"


def convert_main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SRC", help="checkpoint directory (opt-llama or lckv-llama)")
    parser.add_argument("destination", metavar="DST", help="new directory for the converted checkpoint")
    parser.add_argument("--to", required=True, choices=sorted(FORMATS), help="target format")
    args = parser.parse_args(argv)
    check_save_finished("SRC", args.source)
    try:
        convert_checkpoint(args.source, args.destination, args.to)
    except ValueError as error:  # a format that cannot express the model, a missing or existing path
        raise UsageError(str(error)) from None
    print(f"wrote {args.destination} ({args.to})", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    run_cli(convert_main, argv, prog=PROG)


if __name__ == "__main__":
    main()
