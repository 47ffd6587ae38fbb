"""Code shared by the command-line tools (``run_clm.py``, ``run_generation.py``, ``run_streaming.py``,
``test_harness.py``, ``test_latency.py``, ``python -m tools.export`` / ``tools.convert``) and ``bench/``: argument
and file checks with one-line errors, measurement helpers, generation flags. The model package ``models/`` never
imports it.
"""
