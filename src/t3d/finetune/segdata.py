"""Segmentation data: the MSD ``dataset.json``, seeded splits, training patches, whole volumes.

    cases, test, labels = read_msd("Task03_Liver/dataset.json")
    splits = make_splits([c.id for c in cases], [c.id for c in test], fraction=0.1, val_fraction=0.2, ...)
    keys = prepare_cache(cases + test, "runs/seg/cache", preprocess_cfg)        # t3d.data.cases: id -> cache key
    ds = PatchDataset(cache, [keys[i] for i in splits["train"]], windows, (96, 96, 96), num_classes=3, length=N)

Studies go through the pre-training preprocessing (``t3d.data.preprocess``: RAS, target spacing, HU checks, labels
resampled nearest onto the image grid), so a fine-tuned network sees the voxel size and intensity domain its
encoder was pre-trained on. Patches are read from the cache's int16 memory maps (no whole-volume decoding).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from t3d.config import RAS_AXES
from t3d.data.cache import AIR_HU, StudyCache
from t3d.data.cases import SegCase, case_id
from t3d.data.crops import apply_windows, centre_bounds, read_crop, window_params

LESION_WORDS = re.compile(r"lesion|tumou?r|nodule|cancer|mass|cyst|metasta|stone|calcul", re.IGNORECASE)
MAX_POINTS = 4000
"""Voxel positions kept per class and study for label-centred patch sampling."""


def read_msd(dataset_json: str | Path) -> tuple[list[SegCase], list[SegCase], dict[int, str]]:
    """Training cases, labelled test cases and the ``labels`` map of an MSD/BTCV ``dataset.json``.

    Paths resolve against the json's folder. MSD's ``test`` entries are plain image paths without labels: they are
    not returned (no ground truth to score), and the caller carves a test set from ``training`` instead.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise FileNotFoundError(f"dataset description {path} does not exist (expected an MSD-layout dataset.json)")
    desc = json.loads(path.read_text())
    if not isinstance(desc, dict) or not isinstance(desc.get("training"), list) or "labels" not in desc:
        raise ValueError(f"{path}: not an MSD dataset.json (needs 'training': [{{image, label}}] and 'labels')")
    root = path.parent

    def cases(entries: list, where: str) -> list[SegCase]:
        out = []
        for n, entry in enumerate(entries):
            if isinstance(entry, dict) and entry.get("image") and entry.get("label"):
                out.append(SegCase(case_id(entry["image"]), root / entry["image"], root / entry["label"]))
            elif where == "training":
                raise ValueError(f"{path}: training[{n}] needs 'image' and 'label' paths, got {entry!r}")
        return out

    train, test = cases(desc["training"], "training"), cases(desc.get("test") or [], "test")
    ids = [c.id for c in train + test]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{path}: image file names must be unique (they become study ids), repeated: {dupes[:5]}")
    labels = {int(k): str(v) for k, v in desc["labels"].items()}
    if 0 not in labels or sorted(labels) != list(range(len(labels))):
        raise ValueError(f"{path}: 'labels' must map 0..N-1 (0 = background), got keys {sorted(labels)}")
    return train, test, labels


def lesion_classes(labels: dict[int, str]) -> list[int]:
    """Classes whose name says lesion / tumour / nodule / cancer / mass / cyst / metastasis / stone / calculus."""
    return [k for k, name in labels.items() if k > 0 and LESION_WORDS.search(name)]


def make_splits(
    pool: Sequence[str],
    labelled_test: Sequence[str],
    fraction: float,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Seeded train / val / test ids.

    Order of carving, so that comparisons across fractions are fair: the test set (the dataset's labelled test
    cases, else ``test_fraction`` of ``pool``) and the validation set are taken first and do not depend on
    ``fraction``; the training subset is the first ``ceil(fraction * rest)`` ids of one seeded permutation, so
    subsets are nested (1 % inside 10 % inside 100 %).
    """
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    if labelled_test:
        test = list(labelled_test)
    else:
        test = order[: int(round(test_fraction * len(order)))]
        order = order[len(test) :]
    n_val = int(round(val_fraction * len(order))) if len(order) > 1 else 0
    val, rest = order[:n_val], order[n_val:]
    train = rest[: max(1, math.ceil(fraction * len(rest)))] if rest else []
    if not train:
        raise ValueError(
            f"no training studies left after holding out {len(test)} test and {len(val)} validation studies of "
            f"{len(pool)}; lower val_fraction/test_fraction or add studies"
        )
    return {"seed": seed, "fraction": fraction, "pool": len(pool), "train": train, "val": val, "test": test}


def check_label_values(cache_dir: str | Path, keys: dict[str, str], labels: dict[int, str], source: str | Path) -> None:
    """ValueError naming the label files whose values fall outside the ``labels`` map (0..N-1) of ``source``."""
    cache = StudyCache(cache_dir)
    bad = []
    for key in keys.values():
        label = cache.label(key)
        if label is not None and int(label.max()) >= len(labels):
            values = sorted(int(v) for v in np.unique(label) if v >= len(labels))
            bad.append(f"{cache.meta(key).label_source} holds {values[:5]}")
    if bad:
        raise ValueError(
            f"{source}: label values outside its 'labels' map (0..{len(labels) - 1}): {'; '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; add those classes to 'labels' or fix the label files"
        )


def windowed(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """HU (X, Y, Z) -> float32 (C, X, Y, Z), one [0, 1] channel per window (same mapping as pre-training)."""
    out = np.empty((len(windows), *hu.shape), dtype=np.float32)
    np.copyto(out[0], hu, casting="unsafe")
    return apply_windows(out[0], window_params(windows), out)


def load_volume(cache: StudyCache, key: str, windows: Sequence[tuple[float, float]]) -> torch.Tensor:
    """A whole cached study, windowed: float32 (C, X, Y, Z)."""
    return torch.from_numpy(windowed(np.asarray(cache.image(key)), windows))


class PatchDataset(Dataset):
    """Training patches with class-balanced label-centred sampling (the idea of MONAI ``RandCropByLabelClassesd``).

    Item ``i`` comes from study ``keys[i % len(keys)]`` (each study equally often) with draws from a generator seeded
    by ``(seed, i)``, so it does not depend on the number of DataLoader workers. With probability ``pos_fraction``
    the patch is centred on a voxel of a class drawn among the foreground classes present in the study (uniformly,
    or in proportion to ``class_weights``, default 1 per class), else on a random body voxel. Centres are moved
    inwards so the patch lies inside the volume when it fits.

    Item: ``image`` float32 (C, D, H, W) windowed, ``label`` int64 (1, D, H, W), ``id`` str.
    """

    def __init__(
        self,
        cache: StudyCache,
        keys: Sequence[str],
        windows: Sequence[tuple[float, float]],
        size: Sequence[int],
        pos_fraction: float = 0.67,
        flip_prob: float = 0.5,
        seed: int = 0,
        length: int = 1000,
        flip_axes: Sequence[str] = ("AP",),
        class_weights: Mapping[int, float] | None = None,
    ) -> None:
        if not keys:
            raise ValueError("PatchDataset needs at least one cached study")
        self.cache, self.keys = cache, list(keys)
        self.windows = tuple(tuple(w) for w in windows)
        self.size = tuple(int(s) for s in size)
        self.pos_fraction, self.flip_prob, self.seed, self.length = pos_fraction, flip_prob, seed, length
        self.flip_mask = np.array([axis in flip_axes for axis in RAS_AXES])
        self.class_weights = {int(k): float(v) for k, v in (class_weights or {}).items()}
        self._points: dict[str, tuple[list[int], list[np.ndarray], np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def points(self, key: str) -> tuple[list[int], list[np.ndarray], np.ndarray]:
        """The foreground classes present, per class its (N, 3) voxel positions (subsampled), and body voxels (M, 3)."""
        if key not in self._points:
            label = np.asarray(self.cache.label(key))
            rng = np.random.default_rng(self.seed)
            classes, per_class = [], []
            for c in np.unique(label):
                if c == 0:
                    continue
                idx = np.argwhere(label == c)
                classes.append(int(c))
                per_class.append(idx[rng.choice(len(idx), MAX_POINTS, replace=False)] if len(idx) > MAX_POINTS else idx)
            self._points[key] = (classes, per_class, self.cache.foreground(key))
        return self._points[key]

    def pick_class(self, classes: list[int], rng: np.random.Generator) -> int:
        """Index into ``classes`` of the class a positive patch is centred on."""
        w = np.array([self.class_weights.get(c, 1.0) for c in classes])
        if np.all(w == w[0]):
            return int(rng.integers(len(classes)))  # uniform: the draw of runs without class weights
        return int(rng.choice(len(classes), p=w / w.sum()))

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index % len(self.keys)]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(index)]))
        image, label = self.cache.image(key), self.cache.label(key)
        if label is None:
            raise ValueError(f"study {key} has no label map in the cache {self.cache.root}")
        classes, per_class, body = self.points(key)
        if per_class and rng.random() < self.pos_fraction:
            pts = per_class[self.pick_class(classes, rng)]
        else:
            pts = body
        shape = np.asarray(image.shape)
        centre = pts[rng.integers(len(pts))] if len(pts) else rng.integers(0, shape)
        lo, hi = centre_bounds(shape, self.size)
        start = np.clip(centre, lo, hi) - np.asarray(self.size) // 2
        flips = (rng.random(3) < self.flip_prob) & self.flip_mask  # never LR by default (sided labels)
        hu = np.empty((len(self.windows), *self.size), dtype=np.float32)  # (C, D, H, W)
        read_crop(image, start, hu[0], flips, fill=AIR_HU)
        apply_windows(hu[0], window_params(self.windows), hu)
        lab = np.empty(self.size, dtype=np.uint8)
        read_crop(label, start, lab, flips, fill=0)
        return {"image": torch.from_numpy(hu), "label": torch.from_numpy(lab.astype(np.int64))[None], "id": key}
