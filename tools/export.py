"""Write a self-contained checkpoint (the modeling code bundled, loads with ``trust_remote_code=True``).

    python -m tools.export SRC DST

The command line of ``models.export.export_checkpoint``; its docstring says what the checkpoint holds.
"""

import sys

from models.export import export_checkpoint

from .cli import ArgumentParser, UsageError, run_cli
from .training_checkpoints import check_save_finished

PROG = "python -m tools.export"


def export_main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SRC", help="checkpoint directory (opt-llama or lckv-llama)")
    parser.add_argument("destination", metavar="DST", help="new directory for the self-contained checkpoint")
    args = parser.parse_args(argv)
    check_save_finished("SRC", args.source)
    try:
        files = export_checkpoint(args.source, args.destination)
    except ValueError as error:  # a missing or existing path, a model type without LCKV code
        raise UsageError(str(error)) from None
    print(
        f"wrote {args.destination} with {len(files)} code files; load it with "
        f"AutoModelForCausalLM.from_pretrained({str(args.destination)!r}, trust_remote_code=True)",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    run_cli(export_main, argv, prog=PROG)


if __name__ == "__main__":
    main()
