"""clbench: a continual-learning benchmark harness for the multi-task UniHeadNet.

Installed layout: ``clbench`` (core), ``clbench.strategies`` (the repository's ``strategies/``),
``clbench.benchmarks`` (the repository's ``benchmarks/``).
"""

from importlib.machinery import PathFinder
from pathlib import Path
from typing import Iterable

__version__ = "0.1.0"


class ClbenchError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``: every unknown-name error ends with it."""
    import difflib
    hint = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


# Imported straight from a source checkout (e.g. `python -m clbench` in the repository root, which
# shadows a non-editable install), the two sibling folders are not yet under the clbench namespace:
# let this package's path include the checkout root so `clbench.benchmarks` is `<root>/benchmarks`.
_root = Path(__file__).resolve().parent.parent
if (_root / "setup.cfg").is_file() and PathFinder.find_spec("benchmarks", [str(_root)]) is not None:
    if PathFinder.find_spec("benchmarks", __path__) is None:  # noqa: F821 — __path__ is set for packages
        __path__.append(str(_root))  # noqa: F821
