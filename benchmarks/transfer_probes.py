"""Frozen-encoder probes of the transfer benchmark and its sensitivity gate (docs/method.md §7).

    prepare_probe_data(settings, folder, cache, preprocess)    # synthetic labelled studies -> cache with labels
    result = run_probe_stage(checkpoint, pcfg, settings, cache, findings, features, seed)
    gate = sensitivity_gate(stage_results, fractions, n_boot)   # {metric: gate entry}, the report's first table

One stage per (method, seed) computes the study features (fixed tile grid, mean+max pooling) and the lesion-crop
features of every probe study once, keeps them under the stage folder (``t3d.evaluate.features.cached``), and fits
both probes (``t3d.evaluate.probes``). The probe studies are a labelled set of their own, apart from the
pre-training split; their train / validation / test split and the lesion-crop sites depend on ``probe.seed`` only,
so every encoder meets the same studies and the same crops and differences between methods are paired.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from t3d.config import PreprocessConfig, PretrainConfig
from t3d.data.cache import StudyCache
from t3d.data.cases import prepare_cache as prepare_seg_cache
from t3d.data.preprocess import preprocess_manifest
from t3d.data.synthetic import generate_dataset
from t3d.data.targets import read_findings
from t3d.evaluate.features import cached, crop_features, frozen_encoder, study_features, voxel_statistics
from t3d.evaluate.gate import gate_entry
from t3d.evaluate.lesions import cross_check, lesion_sites
from t3d.evaluate.probes import lesion_probe, stratum_names, study_probe
from t3d.finetune.segdata import read_msd
from transfer_config import ProbeSettings
from transfer_controls import SEG_CONTROL
from transfer_results import Results
from transfer_stats import auroc_cell, dice_cell, paired_auroc, paired_dice


def prepare_probe_data(s: ProbeSettings, folder: Path, cache: Path, preprocess: PreprocessConfig, workers: int) -> dict:
    """Generate (or take) the labelled probe studies and preprocess them with their label maps into ``cache``."""
    d = s.data
    if d.num_studies <= 0 and d.manifest.endswith(".json"):  # an MSD dataset.json: every labelled study
        train, test, _ = read_msd(d.manifest)
        keys = prepare_seg_cache([c for c in train + test if c.label is not None], cache, preprocess, workers)
        return {"probe_cache": {"processed": len(keys)}}
    if d.num_studies > 0:
        generate_dataset(folder, d.num_studies, d.seed, preset=d.preset, workers=d.workers, progress=False)
        manifest = folder / "reports.jsonl"  # every study, with its label map
    else:
        manifest = Path(d.manifest)
    summary = preprocess_manifest(manifest, cache, preprocess, workers=workers, progress=False)
    return {"probe_cache": {k: v for k, v in summary.items() if isinstance(v, int | float | str)}}


def probe_split(ids: list[str], s: ProbeSettings) -> dict[str, str]:
    """study id -> train / val / test, a seeded permutation of the sorted ids."""
    order = np.random.default_rng(s.seed).permutation(sorted(ids))
    n_test = int(round(s.test_fraction * len(order)))
    n_val = int(round(s.val_fraction * (len(order) - n_test)))
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(order) - n_test - n_val)
    return {str(i): name for i, name in zip(order, names)}


def run_probe_stage(
    checkpoint: Path | None, pcfg: PretrainConfig, s: ProbeSettings, cache: Path, findings: str, out: Path, seed: int
) -> dict:
    """Both probes for one encoder (``checkpoint=None``: randomly initialised from ``pcfg`` with ``seed``)."""
    enc = frozen_encoder(checkpoint, pcfg, seed=seed)
    ids = [row["id"] for row in StudyCache(cache).index()]
    split = probe_split(ids, s)
    result: dict = {"n_studies": {k: sum(v == k for v in split.values()) for k in ("train", "val", "test")}}
    if findings:
        key = f"{enc.fingerprint}|{cache}|{s.overlap}|{s.max_crops}|{len(ids)}"
        x, got = cached(out / "study_features.pt", key, lambda: study_features(enc, cache, ids, s.overlap, s.max_crops))
        f_ids, names, y_all = read_findings(findings)
        pos = {i: n for n, i in enumerate(f_ids)}
        y = y_all[[pos[i] for i in got]]
        rows = [split[i] for i in got]
        study = study_probe(x.numpy(), y, rows, names, s.l2, s.steps, s.n_boot, seed)
        test = [n for n, r in enumerate(rows) if r == "test"]
        result["study"] = {"metrics": study["metrics"], "l2": study["l2"], "sweep": study["sweep"]}
        result["study_scores"] = {
            "ids": [got[n] for n in test],
            "y": study["labels"],
            "p": study["scores"],
            "names": names,
        }
    sites = lesion_sites(cache, ids, s.lesion_labels, enc.crop_size, s.negatives_per_lesion, s.seed, split)
    key = f"{enc.fingerprint}|{cache}|{len(sites)}|{s.seed}|{s.negatives_per_lesion}|{s.lesion_labels}"
    key += f"|{s.lesion_pooling}|{s.voxel_region}"
    xl = cached(
        out / "lesion_features.pt",
        key,
        lambda: crop_features(enc, cache, sites, pooling=s.lesion_pooling, region=s.voxel_region),
    )
    strata, per_class = s.size_thresholds_mm, s.lesion_probe_per_class
    lesion = lesion_probe(xl.numpy(), sites, split, strata, s.l2, s.steps, s.n_boot, seed, per_class)
    lesion["test"]["ids"] = [f"{sites[n].study}@{','.join(map(str, sites[n].centre))}" for n in lesion["test"]["site"]]
    lesion["pooling"] = s.lesion_pooling
    result["lesion"] = lesion
    stats = voxel_statistics(cache, sites, s.voxel_region)  # the same sites, split and probe: a non-learned control
    control = lesion_probe(stats.numpy(), sites, split, strata, s.l2, s.steps, s.n_boot, seed, per_class)
    result["lesion_voxel_stats"] = {k: control[k] for k in ("strata", "all", "l2", "sweep")}
    result["lesion_voxel_stats"]["region"] = list(s.voxel_region)
    if findings.endswith(".jsonl"):  # synthetic: the label-map lesions against the generator's ground truth
        result["lesion_cross_check"] = cross_check(cache, findings, s.lesion_labels)
    return result


# ----------------------------------------------------------------------------------------------- gate

VOXEL_STATS = "voxel statistics"
"""Row name of the lesion probe's non-learned control (HU statistics of the crop's central box)."""


def finding_groups(r: dict, focal) -> dict[str, list[int]]:
    """Study-probe columns of a probe stage result by group: ``focal`` (the findings named in ``focal``) and
    ``diffuse`` (the rest); empty unless both groups have a column."""
    names = r["study_scores"].get("names") or list(r.get("study", {}).get("metrics", {}).get("per_class", {}))
    groups = {"focal": [c for c, n in enumerate(names) if n in focal]}
    groups["diffuse"] = [c for c, n in enumerate(names) if n not in focal]
    return groups if focal and all(groups.values()) else {}


def expand_probe_results(results: list[dict], thresholds: list[float], focal=()) -> list[dict]:
    """Per probe stage, pseudo stage results in the (ids, y, p) layout the report's cells read: ``study_probe``,
    ``study_probe_focal`` and ``study_probe_diffuse`` (``finding_groups``) and one ``lesion_probe_<stratum>`` per
    size stratum."""
    out = []
    for r in results:
        if r.get("kind") != "probes":
            continue
        base = {"method": r["method"], "seed": r["seed"]}
        if "study_scores" in r:
            scores = r["study_scores"]
            out.append({**base, "kind": "study_probe", **scores})
            for group, cols in finding_groups(r, focal).items():
                y, p = (np.asarray(scores[k], dtype=float)[:, cols].tolist() for k in ("y", "p"))
                out.append({**base, "kind": f"study_probe_{group}", "ids": scores["ids"], "y": y, "p": p})
        t = r["lesion"]["test"]
        for k, name in enumerate(stratum_names(thresholds)):
            keep = [n for n, s in enumerate(t["stratum"]) if s == k]
            y, p = [[t["label"][n]] for n in keep], [[t["score"][n]] for n in keep]
            out.append({**base, "kind": f"lesion_probe_{name}", "ids": [t["ids"][n] for n in keep], "y": y, "p": p})
    return out


def gate_metrics(thresholds: list[float], fractions: list[float], focal=()) -> dict[str, tuple[str, str, float | None]]:
    """Gate metric name -> (stage kind, metric, fraction) for every downstream metric of the benchmark."""
    metrics: dict[str, tuple[str, str, float | None]] = {"study_probe_auroc": ("study_probe", "auroc", None)}
    for group in ("focal", "diffuse") if focal else ():
        metrics[f"study_probe_auroc_{group}"] = (f"study_probe_{group}", "auroc", None)
    for name in stratum_names(thresholds):
        metrics[f"lesion_probe_auroc_{name}"] = (f"lesion_probe_{name}", "auroc", None)
    full = max(fractions)
    for metric in ("organ_dice", "lesion_dice", "small_lesion_dice"):
        metrics[metric] = ("seg", metric, full)
    for f in sorted(set(fractions) - {full}):
        metrics[f"organ_dice_f{f:g}"] = ("seg", "organ_dice", f)
    metrics["frozen_seg_organ_dice"] = ("frozen_seg", "organ_dice", full)
    return metrics


def paired(results: Results, kind: str, metric: str, fraction, a: str, b: str, n_boot: int) -> dict | None:
    """a - b on the seeds both have: ``{"value", "low", "high", ...}`` or None (not measured)."""
    seeds = sorted(set(results.seeds(kind, a, fraction)) & set(results.seeds(kind, b, fraction)))
    if not seeds:
        return None
    extra = {}
    if metric == "auroc":
        ga, gb = (results.score_tensor(kind, m, fraction, seeds) for m in (a, b))
        if ga is None or gb is None or ga[2] != gb[2] or len(ga[2]) == 0:
            return None
        d = paired_auroc(ga[0], ga[1], gb[1], n_boot)
    else:
        reps = results.repeats(kind, [a, b], seeds, fraction)
        ga, gb = (results.seg_matrix(metric, m, fraction, seeds, kind=kind, repeats=reps) for m in (a, b))
        if not reps or ga is None or gb is None or ga[2] != gb[2]:
            return None
        d = paired_dice(ga[0], gb[0], ga[1], n_boot, repeats=len(reps))
        extra = {"per_run_delta": d["per_run_delta"]}
    return {"value": d["mean"], "low": d["low"], "high": d["high"], "seeds": seeds, **extra}


def sensitivity_gate(
    results: list[dict], thresholds: list[float], fractions, n_boot: int, focal=(), lesion_labels=None
) -> dict:
    """The gate of every downstream metric: supervised - random, supervised-seg - random and vssl - random with 95 %
    intervals (the study probe also on its ``focal`` findings and on the rest, where ``focal`` names any; lesion and
    organ Dice split the classes by ``lesion_labels`` as the report's tables do, by name where None)."""
    table = Results([*results, *expand_probe_results(results, thresholds, focal)], lesion_labels)
    gate = {}
    for name, (kind, metric, fraction) in gate_metrics(thresholds, fractions, focal).items():
        sup = paired(table, kind, metric, fraction, "supervised", "random", n_boot)
        ref = paired(table, kind, metric, fraction, "vssl", "random", n_boot)
        seg = paired(table, kind, metric, fraction, SEG_CONTROL, "random", n_boot)
        entry = gate_entry(name, sup, ref, seg)
        entry["seeds"] = (sup or seg or {}).get("seeds", [])
        gate[name] = entry
    return gate


def probe_cells(results: list[dict], methods: list[str], thresholds: list[float], focal=(), n_boot: int = 1000) -> dict:
    """Per method and seed: study-probe macro AUROC (over every finding, and over the ``focal`` and the other
    findings apart) and lesion-probe AUROC per stratum, with their intervals."""
    cells: dict = {}
    for r in results:
        if r.get("kind") != "probes" or r["method"] not in methods:
            continue
        row = {}
        if "study" in r:
            row["study_probe_auroc"] = r["study"]["metrics"]["macro"]["auroc"]
            y, p = (np.asarray(r["study_scores"][k], dtype=float) for k in ("y", "p"))
            for group, cols in finding_groups(r, focal).items():
                cell = auroc_cell(y[:, cols], p[None, :, cols], n_boot)
                row[f"study_probe_auroc_{group}"] = {"value": cell.pop("mean"), **cell}  # as the metrics' intervals
        for name in stratum_names(thresholds):
            row[f"lesion_probe_auroc_{name}"] = r["lesion"]["strata"][name]
        cells.setdefault(r["method"], {})[str(r["seed"])] = row
        if "lesion_voxel_stats" in r and VOXEL_STATS not in cells:  # encoder-independent: shown once
            strata = r["lesion_voxel_stats"]["strata"]
            cells[VOXEL_STATS] = {"-": {f"lesion_probe_auroc_{n}": strata[n] for n in stratum_names(thresholds)}}
    return json.loads(json.dumps(cells))


def frozen_seg_cells(table: Results, methods: list[str], fraction: float, n_boot: int) -> dict:
    """Organ, lesion and small-lesion Dice of the frozen-encoder segmentation probe per method (over seeds x cases)."""
    cells: dict = {}
    for m in methods:
        for metric in ("organ_dice", "lesion_dice", "small_lesion_dice"):
            got = table.seg_matrix(metric, m, fraction, kind="frozen_seg")
            if got is not None:
                cells.setdefault(m, {})[metric] = dice_cell(got[0], got[1], n_boot, repeats=got[3])
    return cells
