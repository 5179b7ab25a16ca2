"""The alignment gates of a text-aligned pre-training run (docs/method.md §7), measured on held-out studies.

    python benchmarks/alignment_gates.py --run t3d=runs/t3d --run t3d-crops=runs/t3d-crops --run clip=runs/clip \\
        --cache cache --splits data/splits.json --heldout finetune test \\
        --out benchmarks/results/alignment_gates_cpu.json

Per run (a ``t3d pretrain`` folder of a joint-space method):

- ``align_share``: how far the final logged ``L_align`` went from chance (log B) towards its floor, the entropy of
  the soft targets H(Y) (``target_entropy`` in ``log.jsonl``): ``(log B - L_align) / (log B - H(Y))``, over the
  last ``--window`` logged entries. Gate: >= 0.3.
- held-out image -> report R@5 with a bootstrap interval over queries, and chance 5 / N. Gate: the interval
  excludes chance (``ci_low > chance``).
- ``heldout_study_cos``: mean pairwise cosine of the held-out study embeddings (the ``t3d evaluate`` pooling).
  Gate: < 0.9.
- ``align: sentence`` runs (``"scores": "sentence"``) are scored as pre-training scored them: a report's sentences
  each against the study's best tile, averaged (``t3d.evaluate.joint.sentence_scores``); their study embedding for
  the collapse gate is the normalised mean of the study's tile embeddings.
- text diagnostic (methods with a restoration decoder): L1 of restoring the hidden lesion voxels of held-out crops
  with a shuffled report minus with the study's own report (``text_diagnostic``; the studies whose crop draws hid a
  lesion voxel; ``*_all_voxels``: every hidden voxel), paired bootstrap over studies. Gate: the interval excludes 0
  on the positive side. ``*_focal_whole`` / ``*_focal_partly``: the same over focal lesions (not effusion)
  hidden entirely / partly.
  ``text_diag_why`` says why it is what it is: how far the report moves the restored image at
  all, the share of hidden voxels that are lesion voxels, the lesion voxels' L1 if restored as their own mean
  (``oracle_l1``) and as their surroundings' mean (``host_fill_l1``), and the L1 per finding type.

Diagnostics that say *why* a gate fails ride along: the logged ``L_view`` against log B, the learnt alignment
temperature, the training-batch study cosine, the held-out report cosine, the relative spread (mean distance from
the centroid over the centroid's norm) of the study embeddings, of the projected reports and of the pooled encoder
features *before* the alignment head (does the encoder separate studies that the joint space maps to one point?),
and how concentrated the top-1 retrieved reports are (``top1_report_share``: the largest fraction of held-out images
whose best report is one and the same report). ``benchmarks/collapse.py`` gives retrieval on the training split.
With ``--probe-train CACHE SPLIT``, each run's frozen encoder is also read through linear retrieval heads trained on
those pairs (``encoder_retrieval``, as the retrieval gate's controls are read in ``benchmarks/transfer_retrieval.py``):
does the encoder hold what its joint space missed?
With ``--ground-truth`` (synthetic data): ``finding_oracle.r5``, the R@5 of a model that knows each held-out study's
findings (type, organ, side) exactly and nothing else, i.e. what the reports' findings allow at all once wording is
set aside; per run ``same_findings_r5``: the share of images whose 5 best reports include one with the image's
own finding set, against its chance under a random ranking (``same_findings_excess``: hit minus chance per image,
with an interval over held-out studies; ``same_findings_comparisons``: every two runs paired on the same
studies); and ``report_lesion_chance``: per focal finding, how likely a voxel of the organ the report names is a
lesion voxel (what a report can tell an L1-trained decoder about a hidden voxel).
The JSON carries the git revision and the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from t3d.data.cache import StudyCache, write_json_atomic
from t3d.data.crops import CropDataset
from t3d.data.synthetic.anatomy import ORGAN_LABELS
from t3d.data.synthetic.findings import FOCAL, LESION_LABELS
from t3d.evaluate.features import frozen_encoder, study_features
from t3d.evaluate.joint import (
    image_embeddings,
    load_joint,
    region_embeddings,
    sentence_embeddings,
    sentence_scores,
    study_dataset,
    text_embeddings,
)
from t3d.evaluate.retrieval import retrieval_from_scores
from t3d.evaluate.retrieval_probe import RetrievalProbeConfig
from t3d.evaluate.studies import read_split, report_texts
from t3d.losses.objective import mean_pairwise_cosine
from t3d.metrics import bootstrap_indices, percentile_interval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_revision  # noqa: E402
from transfer_stages import derangement, one_report, report_conditions, restoration_batch  # noqa: E402

GATES = {"align_share": 0.3, "heldout_study_cos": 0.9}
"""Thresholds of issue 10 item 3: align share at least, held-out cosine below."""


def log_window(run_dir: Path, window: int) -> dict:
    """Means of the last ``window`` logged entries of ``log.jsonl`` (numeric fields only)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r][-window:]
    if not rows:
        raise ValueError(f"{run_dir / 'log.jsonl'}: no logged training step; did `t3d pretrain` run?")
    keys = [k for k, v in rows[-1].items() if isinstance(v, int | float)]
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def align_share(logged: dict, batch: int) -> dict:
    """Share of the way from log B to the floor H(Y) that the logged ``L_align`` covered."""
    chance = math.log(batch)
    floor = logged.get("target_entropy", 0.0)
    share = (chance - logged["align"]) / (chance - floor) if chance > floor else float("nan")
    return {"align": logged["align"], "log_b": chance, "target_entropy": floor, "align_share": share}


def top1_share(sim: torch.Tensor) -> float:
    """Largest fraction of images whose top-1 report is the same report (1/N: spread; near 1: one hub report);
    ``sim`` (N, N): image i vs report j."""
    best = sim.double().argmax(dim=1)
    return float(torch.bincount(best).max()) / len(best)


def relative_spread(x: torch.Tensor) -> float:
    """Mean distance of the rows of ``x`` from their mean, relative to the mean's norm (0: every row identical)."""
    x = x.double()
    centre = x.mean(dim=0)
    return float((x - centre).norm(dim=1).mean() / centre.norm().clamp_min(1e-12))


def paired_diff(a: list[float], b: list[float], n_boot: int, seed: int) -> dict:
    """mean(a - b) with a percentile interval over resampled studies."""
    d = np.asarray(a) - np.asarray(b)
    reps = d[bootstrap_indices(len(d), n_boot, seed)].mean(axis=1)
    return percentile_interval(float(d.mean()), reps).as_dict()


def encoder_features(run_dir: Path, cache: Path, ids: list[str]) -> torch.Tensor:
    """Pooled encoder features per study, before any alignment head: the mean over the fixed tile grid of
    ``t3d.evaluate.features`` (does the encoder tell studies apart even where the joint space does not?)."""
    x, _ = study_features(frozen_encoder(run_dir), cache, ids)
    return x[:, : x.shape[1] // 2]  # the mean half of (mean, max)


def lesion_floors(target: torch.Tensor, hidden: torch.Tensor, lesion: torch.Tensor, ring: int = 2) -> dict:
    """What restoring the hidden lesion voxels of one crop could cost at best and what painting them as their
    surroundings costs: per connected lesion component (26-connected), the L1 (mean over channels) of its hidden
    voxels restored as the component's own mean intensity (``oracle``: knowing what and where, not the noise) and as
    the mean of the non-lesion voxels within ``ring`` voxels of it (``host_fill``: a decoder that restores the organ
    the lesion sits in). Sums and voxel counts, so crops and studies add up. ``whole``: the hidden voxels of the
    components that are hidden entirely (within the crop), where no visible voxel shows the decoder the lesion.

    target: (C, D, H, W); hidden, lesion: (D, H, W) bool.
    """
    out = {"oracle": 0.0, "host_fill": 0.0, "voxels": 0, "host_fill_voxels": 0, "whole": torch.zeros_like(hidden)}
    where = (hidden & lesion).numpy()
    if not where.any():
        return out
    components, count = ndimage.label(lesion.numpy(), structure=np.ones((3, 3, 3)))
    for c in range(1, count + 1):
        comp = components == c
        hid = torch.from_numpy(comp & where)
        if not hid.any():
            continue
        voxels = target[:, hid]  # (C, hidden voxels of the component)
        own = target[:, torch.from_numpy(comp)].mean(dim=1, keepdim=True)
        out["oracle"] += float((voxels - own).abs().mean(dim=0).sum())
        out["voxels"] += int(hid.sum())
        if int(hid.sum()) == int(comp.sum()):
            out["whole"] |= hid
        around = torch.from_numpy(ndimage.binary_dilation(comp, iterations=ring)) & ~lesion
        if around.any():
            host = target[:, around].mean(dim=1, keepdim=True)
            out["host_fill"] += float((voxels - host).abs().mean(dim=0).sum())
            out["host_fill_voxels"] += int(hid.sum())
    return out


@torch.no_grad()
def text_diagnostic(jm, cache: Path, ids: list[str], texts: list[str], repeats: int, seed: int) -> dict:
    """Restoration L1 of held-out crops with each study's own report vs another study's (a derangement), the same
    crops and masks in both conditions: per study, over all hidden voxels, over hidden lesion voxels, and over the
    hidden voxels of focal lesions hidden entirely and of those hidden partly (rows 0-3; NaN where a study's draws
    hid none): does the report add where the image shows nothing of the lesion, or where it shows part of it?
    Tiled models get their crops as a one-tile study; restoration never reads it.

    ``why`` pools over all studies what says why the difference is what it is: how far the report moves the
    restored image at all (mean |restored with the true − with the shuffled report| on hidden lesion voxels and on
    all hidden voxels), the share of hidden voxels that are lesion voxels (the part of the restoration loss a lesion
    can earn), ``lesion_floors`` (the lesion voxels' L1 with their own mean and with their surroundings' mean) and
    the L1 per finding type with the true and the shuffled report.
    """
    model = jm.model
    text = report_conditions(jm, texts, cache)
    perm = derangement(len(ids), seed)
    row = {i: n for n, i in enumerate(ids)}
    data = CropDataset(cache, replace(jm.cfg.crops, augment=False), ids=ids, seed=seed, with_labels=True)
    lesion_classes = torch.tensor(sorted(LESION_LABELS.values()))
    focal_classes = torch.tensor(sorted(LESION_LABELS[f] for f in FOCAL))
    # error sums per study over: all hidden voxels, hidden lesion voxels, hidden voxels of focal lesions hidden
    # entirely, of focal lesions hidden partly
    err = {c: np.zeros((4, len(ids))) for c in ("true", "shuffled")}
    count = np.zeros((4, len(ids)))
    sums = {"change": np.zeros(2), "oracle": 0.0, "host_fill": 0.0, "host_fill_voxels": 0, "floor_voxels": 0}
    by_finding = {name: {"true": 0.0, "shuffled": 0.0, "voxels": 0} for name in LESION_LABELS}
    for r in range(repeats):
        data.set_epoch(r)
        for item in data:
            n = row[item["id"]]
            batch = restoration_batch(jm, item)
            labels = item["labels"][:, 1]  # (K, 1, D, H, W): the restored views
            lesion = torch.isin(labels, lesion_classes)
            outs = {}
            for name, source in (("true", n), ("shuffled", int(perm[n]))):
                generator = torch.Generator().manual_seed(seed * 1_000_003 + r * 1009 + n)  # same mask both times
                outs[name] = model(batch, one_report(jm, text, source), generator=generator)
            hidden, target = outs["true"]["mask"], outs["true"]["target"].float()
            whole = torch.zeros_like(hidden)
            for k in range(target.shape[0]):
                floors = lesion_floors(target[k], hidden[k, 0], lesion[k, 0])
                whole[k, 0] = floors["whole"]
                for key in ("oracle", "host_fill", "host_fill_voxels"):
                    sums[key] += floors[key]
                sums["floor_voxels"] += floors["voxels"]
            l1 = {c: (o["restored"].float() - target).abs().mean(dim=1, keepdim=True) for c, o in outs.items()}
            focal = hidden & torch.isin(labels, focal_classes)
            for j, where in enumerate((hidden, hidden & lesion, focal & whole, focal & ~whole)):
                count[j, n] += float(where.sum())
                for name, e in l1.items():
                    err[name][j, n] += float(e[where].sum())
            for finding, label in LESION_LABELS.items():
                where = hidden & (labels == label)
                by_finding[finding]["voxels"] += int(where.sum())
                for name, e in l1.items():
                    by_finding[finding][name] += float(e[where].sum())
            change = (outs["true"]["restored"].float() - outs["shuffled"]["restored"].float()).abs().mean(dim=1)
            for j, where in enumerate((hidden, hidden & lesion)):
                sums["change"][j] += float(change[where[:, 0]].sum())
    hidden, hidden_lesion = count[:2].sum(axis=1)
    why = {
        "output_change_all_voxels": sums["change"][0] / max(hidden, 1),
        "output_change": sums["change"][1] / hidden_lesion if hidden_lesion else None,
        "lesion_share": hidden_lesion / max(hidden, 1),
        "oracle_l1": sums["oracle"] / sums["floor_voxels"] if sums["floor_voxels"] else None,
        "host_fill_l1": sums["host_fill"] / sums["host_fill_voxels"] if sums["host_fill_voxels"] else None,
        "by_finding": {
            f: {"true": v["true"] / v["voxels"], "shuffled": v["shuffled"] / v["voxels"], "voxels": v["voxels"]}
            for f, v in by_finding.items()
            if v["voxels"]
        },
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        return {**{name: (e / count).tolist() for name, e in err.items()}, "why": why}


def ground_truth_findings(ground_truth: Path) -> dict[str, list[dict]]:
    """``t3d synth``'s ``ground_truth.jsonl``: each study's finding records, by study id."""
    rows = (json.loads(line) for line in ground_truth.read_text().splitlines() if line.strip())
    return {row["id"]: row["findings"] for row in rows}


def report_lesion_chance(ground_truth: Path, cache: Path, ids: list[str]) -> dict:
    """Per focal finding type with an organ label: how likely a voxel of the organ a report names is a voxel of the
    named lesion(s), lesion voxels / (organ + lesion voxels), over the studies whose report names it (median, 90th
    percentile, max). An L1-trained decoder restores a hidden voxel to its conditional median, which the report
    moves only where this chance (sharpened by what the visible voxels show) passes one half."""
    rows = ground_truth_findings(ground_truth)
    store = StudyCache(cache)
    keys = {row["id"]: row["key"] for row in store.index()}
    ratios: dict[str, list[float]] = {}
    for i in ids:
        if i not in rows or i not in keys:
            raise ValueError(f"{ground_truth} / {cache}: study {i} is missing from the ground truth or the cache")
        labels = None
        named: dict[tuple[str, str], int] = {}
        for f in rows[i]:
            if f["type"] in LESION_LABELS and f.get("organ") in ORGAN_LABELS:
                named[(f["type"], f["organ"])] = named.get((f["type"], f["organ"]), 0) + int(f["voxels"])
        for (kind, organ), voxels in named.items():
            if labels is None:
                labels = store.label(keys[i])
                if labels is None:
                    raise ValueError(f"{cache}: study {i} has no label map; the lesion chance needs one")
            host = int((labels == ORGAN_LABELS[organ]).sum())
            ratios.setdefault(kind, []).append(voxels / (host + voxels))
    return {
        kind: {
            "median": float(np.median(v)),
            "p90": float(np.quantile(v, 0.9)),
            "max": float(np.max(v)),
            "studies": len(v),
        }
        for kind, v in sorted(ratios.items())
    }


def finding_sets(ground_truth: Path, ids: list[str]) -> list[frozenset]:
    """Each study's findings as a set of (type, organ, side) from ``t3d synth``'s ``ground_truth.jsonl``."""
    rows = {
        i: frozenset((f["type"], f.get("organ"), f.get("side")) for f in findings)
        for i, findings in ground_truth_findings(ground_truth).items()
    }
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ValueError(f"{ground_truth}: no ground truth for {len(missing)} held-out studies, e.g. {missing[0]}")
    return [rows[i] for i in ids]


def finding_oracle_r5(sets: list[frozenset], seed: int, draws: int = 20) -> float:
    """Image -> report R@5 of a model that knows each study's findings exactly and nothing else: reports ranked by
    the Jaccard similarity of their finding sets to the image's, ties broken at random (mean over ``draws``)."""
    rng = np.random.default_rng(seed)
    n = len(sets)
    sim = np.array([[len(a & b) / len(a | b) if a | b else 1.0 for b in sets] for a in sets])
    hits = []
    for _ in range(draws):
        order = np.lexsort((rng.random((n, n)), -sim), axis=1)[:, :5]  # by similarity, then a random tie-break
        hits.append(np.mean([i in order[i] for i in range(n)]))
    return float(np.mean(hits))


def same_findings_r5(sim: torch.Tensor, sets: list[frozenset]) -> dict:
    """Share of held-out images whose 5 best reports include one with the image's own finding set (phrasing aside),
    and its chance under a random ranking: did the joint space learn findings, even where it cannot match wording?
    ``sim`` (N, N): image i vs report j."""
    hit, chance = same_findings_hits(sim, sets)
    return {"same_findings_r5": float(np.mean(hit)), "same_findings_r5_chance": float(np.mean(chance))}


def same_findings_hits(sim: torch.Tensor, sets: list[frozenset]) -> tuple[np.ndarray, np.ndarray]:
    """Per image of ``same_findings_r5``: 1.0 where its 5 best reports include its own finding set, and the chance
    of that under a random ranking (its own report counts: a set shared by m of N reports)."""
    n = len(sets)
    k = min(5, n)  # fewer than 5 reports: every one is in the top k
    top = sim.topk(k, dim=1).indices.tolist()
    hit = [any(sets[j] == sets[i] for j in row) for i, row in enumerate(top)]
    same = [sum(s == sets[i] for s in sets) for i in range(n)]  # the own report included
    chance = [1.0 - math.comb(n - m, k) / math.comb(n, k) for m in same]
    return np.asarray(hit, dtype=float), np.asarray(chance)


def same_findings_comparisons(runs: dict[str, dict], n_boot: int, seed: int) -> list[dict]:
    """Paired same-findings R@5 of every two runs measured on the same held-out studies: mean(hit_a - hit_b) with a
    percentile interval over resampled studies."""
    names = [name for name, r in runs.items() if "same_findings_hits" in r]
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = paired_diff(runs[a]["same_findings_hits"], runs[b]["same_findings_hits"], n_boot, seed)
            out.append({"a": a, "b": b, "diff": d["value"], "ci_low": d["low"], "ci_high": d["high"]})
    return out


def measure(run_dir: Path, cache: Path, ids: list[str], args) -> dict:
    """Every gate and diagnostic of one run."""
    jm = load_joint(run_dir)
    jm.require_joint_space()
    logged = log_window(run_dir, args.window)
    out = {"method": jm.method, "step": jm.step, **align_share(logged, jm.cfg.train.batch_size)}
    out["final_log"] = {k: logged[k] for k in ("view", "tau_align", "study_cos", "restore", "loss") if k in logged}
    ids, texts = report_texts(cache, jm.cfg.text.sections, ids)
    data = study_dataset(jm.cfg, jm.spec, cache, ids, max_crops=args.max_crops)
    t = text_embeddings(jm, texts, cache / "text")
    if jm.sentence_aligned:  # each report sentence against the study's best tile; u = the tiles' mean direction
        regions, got = region_embeddings(jm, data)
        sim = sentence_scores(regions, *sentence_embeddings(jm, texts, cache / "text"), len(texts))
        u = torch.nn.functional.normalize(torch.stack([r.mean(dim=0) for r in regions]), dim=-1)
        out["scores"] = "sentence"
    else:
        u, got = image_embeddings(jm, data)
        sim = u @ t.T  # (N, N) image i vs report j, as pre-training scored a pair
    if got != ids:
        raise ValueError(f"{cache}: the cached studies and their reports do not line up")
    r = retrieval_from_scores(sim, n_boot=args.n_boot, seed=args.seed, reports=texts)
    r5 = r["image_to_report"]["R@5"]
    out.update(
        n_heldout=len(ids),
        retrieval_r5=r5["value"],
        retrieval_r5_ci_low=r5["low"],
        retrieval_r5_ci_high=r5["high"],
        retrieval_chance=r["chance"]["R@5"],
        heldout_study_cos=float(mean_pairwise_cosine(u)),
        heldout_report_cos=float(mean_pairwise_cosine(t)),
        top1_report_share=top1_share(sim),
        heldout_study_spread=relative_spread(u),
        heldout_report_spread=relative_spread(t),
        heldout_feature_spread=relative_spread(encoder_features(run_dir, cache, ids)),
        duplicate_reports=r.get("duplicate_reports", 0),
    )
    if args.ground_truth:
        hit, chance = same_findings_hits(sim, finding_sets(Path(args.ground_truth), ids))
        excess = paired_diff(hit, chance, args.n_boot, args.seed)
        out.update(
            same_findings_r5=float(hit.mean()),
            same_findings_r5_chance=float(chance.mean()),
            same_findings_excess=excess["value"],
            same_findings_excess_ci_low=excess["low"],
            same_findings_excess_ci_high=excess["high"],
            same_findings_hits=hit.astype(int).tolist(),
        )
    if jm.model.decoder is not None:
        diag = text_diagnostic(jm, cache, ids, texts, args.repeats, args.seed)
        for j, suffix in ((1, ""), (0, "_all_voxels"), (2, "_focal_whole"), (3, "_focal_partly")):  # gate: row 1
            true, shuffled = (np.asarray(diag[c][j]) for c in ("true", "shuffled"))
            keep = np.isfinite(true) & np.isfinite(shuffled)
            if j >= 2 and keep.sum() < 2:  # the focal rows only: e.g. no lesion hidden entirely in any draw
                continue
            d = paired_diff(shuffled[keep], true[keep], args.n_boot, args.seed)
            out.update(
                {
                    f"text_diag_true{suffix}": float(true[keep].mean()),
                    f"text_diag_shuffled{suffix}": float(shuffled[keep].mean()),
                    f"text_diag_diff{suffix}": d["value"],
                    f"text_diag_ci_low{suffix}": d["low"],
                    f"text_diag_ci_high{suffix}": d["high"],
                    f"text_diag_studies{suffix}": int(keep.sum()),
                }
            )
        out["text_diag_why"] = diag["why"]
    out["passes"] = gate_passes(out)
    return out


def encoder_retrieval(run_dir: Path, ids: list[str], args) -> dict:
    """Held-out R@5 of linear heads on the run's frozen encoder, trained on the ``--probe-train`` pairs."""
    from transfer_retrieval import run_retrieval_probe_stage  # it imports this module

    cache, split = args.probe_train
    truth = Path(args.ground_truth) if args.ground_truth else None
    pcfg = load_joint(run_dir).cfg
    train, test = (Path(cache), read_split(args.splits, split)), (Path(args.cache), ids)
    return run_retrieval_probe_stage(
        run_dir, pcfg, RetrievalProbeConfig(), train, test, truth, args.seed, args.max_crops
    )


def gate_passes(m: dict) -> dict:
    """Each gate's verdict (None: not applicable to the method)."""
    diag = m.get("text_diag_ci_low")
    return {
        "align_share": bool(m["align_share"] >= GATES["align_share"]),
        "retrieval_above_chance": bool(m["retrieval_r5_ci_low"] > m["retrieval_chance"]),
        "heldout_study_cos": bool(m["heldout_study_cos"] < GATES["heldout_study_cos"]),
        "text_diagnostic": None if diag is None else bool(diag > 0),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR of `t3d pretrain` (repeatable)")
    p.add_argument("--cache", required=True, help="`t3d preprocess` cache holding the held-out studies and reports")
    p.add_argument("--splits", required=True, help="JSON split file")
    p.add_argument("--heldout", nargs="+", default=["finetune", "test"], help="split names pooled as held-out")
    p.add_argument("--window", type=int, default=2, help="logged entries averaged for the final L_align")
    p.add_argument("--repeats", type=int, default=2, help="crop/mask draws per study of the text diagnostic")
    p.add_argument("--max-crops", type=int, default=27)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setup", default="", help="free text stored with the result (data, steps, model)")
    p.add_argument("--ground-truth", help="`t3d synth`'s ground_truth.jsonl: adds the finding-level diagnostics")
    p.add_argument(
        "--probe-train",
        nargs=2,
        metavar=("CACHE", "SPLIT"),
        help="also read each run's frozen encoder through linear retrieval heads (benchmarks/transfer_retrieval.py) "
        "trained on SPLIT's studies in CACHE (the pre-training pairs): `encoder_retrieval` per run",
    )
    p.add_argument("--out", default="benchmarks/results/alignment_gates_cpu.json")
    args = p.parse_args(argv)
    ids = [i for split in args.heldout for i in read_split(args.splits, split)]
    result = {
        "revision": git_revision(),
        "command": shlex.join(["python", "benchmarks/alignment_gates.py", *argv]),
        "setup": args.setup,
        "gates": {"align_share_min": GATES["align_share"], "heldout_study_cos_max": GATES["heldout_study_cos"]},
        "runs": {},
    }
    if args.ground_truth:
        sets = finding_sets(Path(args.ground_truth), ids)
        result["finding_oracle"] = {
            "r5": finding_oracle_r5(sets, args.seed),
            "chance": 5 / len(ids),
            "distinct_finding_sets": len(set(sets)),
            "studies_without_findings": sum(not s for s in sets),
        }
        print("finding oracle", json.dumps(result["finding_oracle"]))
        result["report_lesion_chance"] = report_lesion_chance(Path(args.ground_truth), Path(args.cache), ids)
        print("report lesion chance", json.dumps(result["report_lesion_chance"]))
    for spec in args.run:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--run {spec!r}: expected NAME=RUN_DIR, e.g. --run t3d=runs/t3d")
        result["runs"][name] = measure(Path(folder), Path(args.cache), ids, args)
        if args.probe_train:
            result["runs"][name]["encoder_retrieval"] = encoder_retrieval(Path(folder), ids, args)
        print(name, json.dumps({k: v for k, v in result["runs"][name].items() if k != "final_log"}))
    if args.ground_truth and len(result["runs"]) > 1:
        result["same_findings_comparisons"] = same_findings_comparisons(result["runs"], args.n_boot, args.seed)
        print("same findings, paired", json.dumps(result["same_findings_comparisons"]))
    write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
