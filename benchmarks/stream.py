"""The only module that talks to Avalanche: experience datasets → a stream (an experience trains one task).

Imported lazily (``import avalanche`` takes seconds and patches ``Dataset.__add__`` globally).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from torch.utils.data import Dataset

from .images import collate


def labelled(ds: Dataset, task_label: int) -> Any:
    """``ds`` as an AvalancheDataset whose items are (x, y, task_label), with its collate function."""
    with warnings.catch_warnings():  # "no QP solver found": only GEM-style strategies would need one
        warnings.simplefilter("ignore", UserWarning)
        from avalanche.benchmarks.utils import AvalancheDataset
        from avalanche.benchmarks.utils.data_attribute import TaskLabels
        from avalanche.benchmarks.utils.flat_data import ConstantSequence
    return AvalancheDataset([ds], data_attributes=[TaskLabels(ConstantSequence(task_label, len(ds)))],
                            collate_fn=collate)


def build_stream(train: Sequence[tuple[Dataset, int]], test: Sequence[Dataset]) -> Any:
    """A benchmark whose train experience k is ``train[k]``'s dataset with its task label (an experience trains one
    task, a task may have several), and whose test experience k is task k's test set with task label k; items are
    (x, y, t)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from avalanche.benchmarks.scenarios import benchmark_from_datasets
        from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    return with_task_labels(benchmark_from_datasets(
        train=[labelled(ds, label) for ds, label in train], test=[labelled(ds, k) for k, ds in enumerate(test)]))
