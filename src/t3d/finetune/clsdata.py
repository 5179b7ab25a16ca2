"""The train/val/test split of labelled studies for classification (labels: ``t3d.data.labels``).

table = prepare_label_cache(read_labels("findings.csv"), "runs/cls/cache", pre.preprocess)
splits = split_studies(table.ids, "splits.json", fraction=0.1, seed=0)         # {"train", "val", "test"}
"""

from __future__ import annotations

from pathlib import Path

from t3d.evaluate.studies import read_split
from t3d.finetune.segdata import make_splits


def split_studies(
    ids: list[str],
    splits: str | Path | None = None,
    train_split: str = "finetune",
    test_split: str = "test",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` study ids, each in ``ids`` order (``t3d.finetune.segdata.make_splits``).

    With a split file the test set is its ``test_split`` and the pool is its ``train_split``; without one the test
    set is a seeded ``test_fraction`` of all studies. Validation (``val_fraction`` of the pool) is carved before the
    label ``fraction`` is applied, and training subsets are nested across fractions (same seed). Ids that are not
    in ``ids`` (not labelled or not cached) are dropped.
    """
    have = set(ids)
    if splits:
        pool = [i for i in read_split(splits, train_split) if i in have]
        test = [i for i in read_split(splits, test_split) if i in have]
        both = set(pool) & set(test)
        if both:
            raise ValueError(f"{splits}: {len(both)} studies are in both '{train_split}' and '{test_split}'")
        if not test:
            raise ValueError(f"{splits}: no labelled, cached study in split '{test_split}'")
    else:
        pool, test = list(ids), []
    parts = make_splits(pool, test, fraction, val_fraction, test_fraction, seed)
    if not parts["test"]:
        raise ValueError(f"no test studies: {len(ids)} labelled studies with test_fraction={test_fraction}")
    position = {i: n for n, i in enumerate(ids)}
    return {name: sorted(parts[name], key=position.__getitem__) for name in ("train", "val", "test")}
