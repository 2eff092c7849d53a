"""The benchmark of hf_pruning on the real SmolLM2-135M: the grid, its runner, the generated tables and the
reference model cards. It lives beside the package, not in it: ``pip install .`` installs ``hf_pruning`` only.

Run it from the repository root (a clone), in the project's virtualenv::

    make bench          # python -m benchmarks.run                 -> benchmarks/results/smollm2.{json,md}
    make bench-quick    # python -m benchmarks.run --quick         -> benchmarks/results/smollm2-quick.{json,md}
    make cards          # python -m benchmarks.cards               -> model_cards/<name>/README.md

Modules: ``grid`` (rows and protocol sizes), ``runner`` (one row at a time, resumable), ``searches`` (the
shared FinerCut search and the search-cost comparisons), ``report`` (markdown and plots), ``counts``
(non-zero parameters and KV bytes of a model), ``assets`` (the SmolLM2 loader), ``run``, ``cards`` and
``compare`` (the commands; ``compare`` checks rerun rows against the committed numbers).
"""
