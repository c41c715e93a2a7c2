"""clbench: a continual-learning benchmark harness for the multi-task UniHeadNet.

Installed layout: ``clbench`` (core), ``clbench.strategies`` (the repository's ``strategies/``),
``clbench.benchmarks`` (the repository's ``benchmarks/``).
"""

__version__ = "0.1.0"


class ClbenchError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""
