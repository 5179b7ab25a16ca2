"""Pre-trained vs random encoder on the sensitive evaluations: the frozen-encoder probes (docs/method.md §7), as
``t3d demo`` reports them.

    probes = compare_probes("demo_out/runs/pretrain", cfg, "demo_out/cache", "demo_out/data", seed=0)
    # {"study_probe_auroc": {"pretrained": Interval, "random": Interval, "diff": Interval}, "lesion_probe_auroc_small":
    #  ..., "lesion_probe_auroc_all": ..., "n_studies": {...}, "lesions": {...}}
    seg = paired_case_diff(pre_cases, rand_cases, "dice")      # mean Dice per test case, pre-trained - random

Both encoders meet the same studies, the same tile grid and the same lesion crops, so their difference is paired:
one set of bootstrap resamples over test studies (study probe) or test studies as clusters (lesion probe) gives the
interval of ``pretrained - random``. Probe split from the demo's split file: the pre-training studies train the
probes (a seeded ``VAL_FRACTION`` of them chooses the L2 strength), the fine-tune and test studies, never seen by
pre-training, score them. Lesion-free crops are drawn per probe split, so a negative belongs to the same split as
the positive it is matched to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from t3d.config import PretrainConfig
from t3d.data.cache import StudyCache
from t3d.data.synthetic.findings import FOCAL, LESION_LABELS
from t3d.data.targets import read_findings
from t3d.evaluate.features import FrozenEncoder, crop_features, frozen_encoder, study_features
from t3d.evaluate.lesions import CropSite, lesion_sites
from t3d.evaluate.probes import lesion_probe, paired_cluster_auroc, paired_macro_auroc, study_probe
from t3d.evaluate.studies import read_split
from t3d.metrics import bootstrap_indices, percentile_interval

HELD_OUT = ("finetune", "test")
"""Splits of the demo's split file that score the probes (never seen by pre-training)."""
VAL_FRACTION = 0.25
"""Share of the pre-training studies that chooses the probes' L2 strength."""
SMALL_MM = 10.0
"""Lesions below this equivalent diameter form the ``small`` stratum of the lesion probe."""


def probe_split(splits: str | Path, seed: int = 0) -> dict[str, str]:
    """study id -> ``train``/``val``/``test``: ``test`` for the held-out splits (``HELD_OUT``), a seeded
    ``VAL_FRACTION`` of the ``pretrain`` split ``val``, the rest ``train``."""
    pretrain = np.random.default_rng(seed).permutation(sorted(read_split(splits, "pretrain")))
    n_val = int(round(VAL_FRACTION * len(pretrain)))
    out = {str(i): "val" if n < n_val else "train" for n, i in enumerate(pretrain)}
    out.update({i: "test" for name in HELD_OUT for i in read_split(splits, name)})
    return out


def compare_probes(run: str | Path, cfg: PretrainConfig, cache: str | Path, data: str | Path, seed: int = 0) -> dict:
    """Study-level finding probe and lesion probe for the checkpoint ``run`` and a random encoder of ``cfg``."""
    data = Path(data)
    split = probe_split(data / "splits.json", seed)
    ids = [row["id"] for row in StudyCache(cache).index() if row["id"] in split]
    encoders = {"pretrained": frozen_encoder(run), "random": frozen_encoder(None, cfg, seed=seed)}
    f_ids, names, y_all = read_findings(data / "ground_truth.jsonl")
    row_of = {i: n for n, i in enumerate(f_ids)}
    # Negatives from lesion-free studies of the positive's own probe split.
    sites = lesion_sites(cache, ids, [LESION_LABELS[k] for k in FOCAL], cfg.crops.size, seed=seed, split_of=split)
    study_scores, lesion_scores = {}, {}
    for name, enc in encoders.items():
        study_scores[name], rows = _study_probe(enc, cache, ids, split, names, y_all, row_of, seed)
        lesion_scores[name] = _lesion_probe(enc, cache, sites, split, seed)
    out: dict = {"n_studies": {k: rows.count(k) for k in ("train", "val", "test")}}
    out["study_probe_auroc"] = {n: s["metrics"]["macro"]["auroc"] for n, s in study_scores.items()}
    test_y = np.asarray(study_scores["pretrained"]["labels"])
    pre, rand = (np.asarray(study_scores[n]["scores"]) for n in ("pretrained", "random"))
    out["study_probe_auroc"]["diff"] = paired_macro_auroc(test_y, pre, rand, seed=seed)
    out.update(_lesion_cells(lesion_scores, seed))
    return out


def _lesion_probe(enc: FrozenEncoder, cache, sites: list[CropSite], split: dict[str, str], seed: int) -> dict | None:
    """The lesion probe at lesion scale (the encoder's cells over the crop's central box, as the benchmark reads it),
    or None where the training studies lack lesion or lesion-free crops (tiny datasets)."""
    if {s.label for s in sites if split.get(s.study) == "train"} != {0, 1}:
        return None
    x = crop_features(enc, cache, sites, pooling="centre").numpy()
    return lesion_probe(x, sites, split, (SMALL_MM,), seed=seed)


def _lesion_cells(scores: dict[str, dict | None], seed: int) -> dict:
    """``lesion_probe_auroc_{small,all}``: both encoders' AUROC and their paired difference (NaN: not measurable)."""
    if any(s is None for s in scores.values()):
        return {f"lesion_probe_auroc_{k}": {n: _nan_interval() for n in (*scores, "diff")} for k in ("small", "all")}
    test = scores["pretrained"]["test"]
    stratum = np.asarray(test["stratum"])
    out: dict = {"lesions": {k: scores["pretrained"]["strata"][k] for k in ("small", "large")}}
    for key, keep in (("small", stratum == 0), ("all", np.ones(len(stratum), bool))):
        cell = {n: s["all"] if key == "all" else s["strata"][key] for n, s in scores.items()}
        y, clusters = np.asarray(test["label"])[keep], np.asarray(test["study"])[keep]
        a, b = (np.asarray(scores[n]["test"]["score"])[keep] for n in ("pretrained", "random"))
        both = 0 < y.sum() < len(y)
        cell["diff"] = paired_cluster_auroc(y, a, b, clusters, seed=seed) if both else _nan_interval()
        out[f"lesion_probe_auroc_{key}"] = cell
    return out


def _study_probe(enc: FrozenEncoder, cache, ids, split, names, y_all, row_of, seed: int):
    x, got = study_features(enc, cache, ids)
    y = y_all[[row_of[i] for i in got]]
    rows = [split[i] for i in got]
    return study_probe(x.numpy(), y, rows, names, seed=seed), rows


def _nan_interval() -> dict:
    nan = float("nan")
    return {"value": nan, "low": nan, "high": nan}


def paired_case_diff(a: Sequence[dict], b: Sequence[dict], key: str, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-case ``key`` (a number, or a per-class dict/list averaged over its finite values) of two runs scored on the
    same test cases: ``{"pretrained", "random", "diff"}`` intervals over resampled cases (cases NaN in either run
    are dropped)."""
    va, vb = (np.array([_case_value(c.get(key)) for c in cases]) for cases in (a, b))
    if len(va) != len(vb) or [c.get("id") for c in a] != [c.get("id") for c in b]:
        raise ValueError("paired_case_diff: the two runs were scored on different test cases")
    keep = np.isfinite(va) & np.isfinite(vb)
    va, vb = va[keep], vb[keep]
    if not len(va):
        return {"pretrained": _nan_interval(), "random": _nan_interval(), "diff": _nan_interval()}
    idx = bootstrap_indices(len(va), n_boot, seed)
    return {
        name: percentile_interval(float(v.mean()), v[idx].mean(axis=1)).as_dict()
        for name, v in (("pretrained", va), ("random", vb), ("diff", va - vb))
    }


def _case_value(value) -> float:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        finite = [float(v) for v in value if v is not None and math.isfinite(float(v))]
        return float(np.mean(finite)) if finite else float("nan")
    return float("nan") if value is None else float(value)


def verdict(diffs: dict[str, dict]) -> str:
    """One line: did pre-training help at this size? Judged by the intervals of ``pretrained - random`` only."""
    helped = [m for m, d in diffs.items() if d.get("low", math.nan) > 0]
    hurt = [m for m, d in diffs.items() if d.get("high", math.nan) < 0]
    if helped or hurt:
        parts = [f"helped on {', '.join(helped)}"] if helped else []
        parts += [f"was worse than random on {', '.join(hurt)}"] if hurt else []
        ci = "95 % CI of the difference excludes 0"
        return f"Pre-training {'; '.join(parts)} ({ci}); no measurable difference elsewhere."
    return "Pre-training vs random: no measurable difference at this size (every 95 % CI of the difference includes 0)."
