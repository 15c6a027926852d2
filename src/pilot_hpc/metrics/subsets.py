"""Evaluation subsets (data.eval_subsets) and the cheaper interim evaluations
(data.eval_interim_samples): which items a round scores and each subset's metric."""

from __future__ import annotations

import copy
import math

from pilot_hpc.errors import DataError


def eval_view(dataset, interim_samples: int, final: bool):
    """The dataset a round scores: all of it in the last round, else its first
    `interim_samples` items (0: all). A shallow copy sharing the decoded-image cache."""
    if final or interim_samples <= 0 or interim_samples >= len(dataset):
        return dataset
    view = copy.copy(dataset)
    view.samples = dataset.samples[:interim_samples]
    return view


def subset_values(dataset, items: list[float], names: list[str]) -> list[float]:
    """Per name, the mean score of the items tagged with it (NaN when there are none):
    the metric of a subset, as the mean of per-item scores is the metric of the split
    (CIDEr's items use the whole split's document frequencies)."""
    if not names:
        return []
    sums = {n: [0.0, 0] for n in names}
    for sample, score in zip(dataset.samples, items):
        if sample.subset is None:
            continue
        if sample.subset not in sums:
            raise DataError(f"{sample.where or sample.id}: subset {sample.subset!r} is not in data.eval_subsets "
                            f"{names}: add it there or retag the record")
        sums[sample.subset][0] += score
        sums[sample.subset][1] += 1
    return [s / n if n else math.nan for s, n in sums.values()]
