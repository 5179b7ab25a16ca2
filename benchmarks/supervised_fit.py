"""Does the ``supervised`` control fit its per-crop targets, and do its frozen features see lesions?

    .venv/bin/python benchmarks/supervised_fit.py --config benchmarks/transfer_gate_smoke.yaml \
        --pretrain.train.steps 300 --pretrain.train.lr 3e-3

Uses the data, pre-training cache and probe studies of a transfer-benchmark configuration (the same ``Plan`` and
stage code as ``benchmarks/transfer.py``, in the work folder ``<work>/supervised_fit/<name>``, checked against the
settings it was made with like the benchmark's; ``--name`` gives other data settings a folder of their own), then:

1. pre-trains ``supervised`` with the configuration's settings (flags override them, as for ``transfer.py``);
2. the *base-rate BCE* of its targets: per finding, the positive share over every crop site of the epochs it
   trained on (the same items and crops, ``CropDataset`` draws are seeded per epoch and item), and the mean binary
   entropy of those shares: the loss of a model that knows only the priors;
3. the trained model's BCE and per-finding AUROC on one *fresh* epoch of crops of the same studies;
4. the study-probe and lesion-probe AUROC (per size stratum) of ``supervised`` and ``random`` (``run_probe_stage``:
   the benchmark's studies, sites, split and probes) and the paired study-probe gain ``supervised - random`` with
   its bootstrap interval, the quantity of the sensitivity gate;
5. the trained finding head itself on those probe crops (no probe fitted, every split): AUROC of its largest focal
   logit, lesion-centred crops vs their location-matched negatives. Near 0.5 while the fresh-epoch AUROC is high,
   the head recognises its training studies rather than lesions.

Writes ``benchmarks/results/supervised_fit.json`` (with the git revision and command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from provenance import git_revision
from t3d.checkpoint import latest_checkpoint, load_checkpoint
from t3d.data.cache import StudyCache, write_json_atomic
from t3d.data.synthetic.findings import CSV_COLUMNS, FOCAL
from t3d.evaluate.features import frozen_encoder, site_crops
from t3d.evaluate.joint import load_joint
from t3d.evaluate.lesions import lesion_sites
from t3d.losses import method_spec
from t3d.metrics import auroc
from t3d.pretrain.data import FindingTargets, build_dataset
from t3d.pretrain.model import PretrainModel
from transfer import check_work_folder
from transfer_config import load_transfer_config, run_stages
from transfer_plan import Plan
from transfer_probes import probe_split, run_probe_stage
from transfer_stages import fresh_folder, run_pretrain_stage
from transfer_stats import paired_auroc

ROOT = Path(__file__).resolve().parents[1]


def crop_targets(targets: FindingTargets, dataset, epochs: list[int]) -> torch.Tensor:
    """Targets (N, L) of every crop site of ``epochs`` (view 0, as the control trains)."""
    rows = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            rows.append(targets.for_batch(collate_one(dataset[i]))[0])
    return torch.cat(rows)


def collate_one(item: dict) -> dict:
    batch = {k: v[None] for k, v in item.items() if torch.is_tensor(v)}
    batch["index"] = torch.tensor([item["index"]])
    return batch


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@torch.no_grad()
def fresh_epoch_fit(run_dir: Path, pcfg, targets: FindingTargets, dataset, epoch: int) -> dict:
    """BCE and per-finding AUROC of the trained finding head on one unseen epoch of crops."""
    state = load_checkpoint(latest_checkpoint(run_dir))
    model = PretrainModel(pcfg, method_spec("supervised"), text_dim=1, num_findings=len(targets.classes))
    model.load_state_dict(state["model"])
    model.eval()
    dataset.set_epoch(epoch)
    logits, ys = [], []
    for i in range(len(dataset)):
        batch = collate_one(dataset[i])
        out = model(batch, {"frozen": torch.zeros(1, 1), "findings": targets.for_batch(batch)})
        logits.append(out["finding_logits"][0])
        ys.append(out["finding_targets"][0])
    z, y = torch.cat(logits), torch.cat(ys)
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))
    per = {c: auroc(y[:, j].numpy(), z[:, j].numpy()) if 0 < y[:, j].sum() < len(y) else None
           for j, c in enumerate(targets.classes)}  # fmt: skip
    return {"bce": bce, "auroc": per, "crops": len(y)}


@torch.no_grad()
def head_on_probe_crops(run_dir: Path, plan: Plan, s, seed: int, thresholds: list[float]) -> dict:
    """AUROC of the finding head's largest focal logit on the lesion probe's crops, per size stratum."""
    cache = plan.caches["probe"]
    ids = [row["id"] for row in StudyCache(cache).index()]
    enc = frozen_encoder(run_dir, seed=seed)
    sites = lesion_sites(
        cache, ids, s.lesion_labels, enc.crop_size, s.negatives_per_lesion, s.seed, probe_split(ids, s)
    )
    classes = load_checkpoint(latest_checkpoint(run_dir))["finding_classes"]
    model = load_joint(run_dir, torch.device("cpu")).model.eval()
    crops = site_crops(cache, sites, enc.crop_size, enc.windows)
    logits = torch.cat([model.finding_logits(model.encoder.forward_features(x)) for x in crops])
    focal = [classes.index(CSV_COLUMNS[k]) for k in FOCAL]
    score = logits[:, focal].max(dim=1).values.numpy()
    y = np.array([site.label for site in sites])
    diameter = np.array([site.diameter_mm for site in sites])
    edges = [0.0, *thresholds, np.inf]
    out = {"sites": len(sites), "positives": int(y.sum())}
    for lo, hi in zip(edges[:-1], edges[1:]):
        keep = (diameter >= lo) & (diameter < hi)
        out[f"{lo:g}-{hi:g} mm"] = auroc(y[keep], score[keep])
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "benchmarks" / "transfer_gate_smoke.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "supervised_fit.json"))
    args, overrides = p.parse_known_args(argv)
    cfg = load_transfer_config(args.config, False, overrides)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    plan = Plan(cfg, ROOT / cfg.work / "supervised_fit" / cfg.name)  # --name: a folder per data / budget setting
    check_work_folder(plan.work, cfg)
    run_stages([s for s in plan.stages() if s.name in ("data", "prepare", "probe_data")])
    pcfg = plan.pretrain_config("supervised", args.seed)
    tc = pcfg.train
    run_dir = plan.work / f"supervised_s{tc.steps}_b{tc.batch_size}_lr{tc.lr:g}"
    pcfg = dataclasses.replace(pcfg, train=dataclasses.replace(tc, out=str(run_dir)))
    fresh_folder(run_dir)
    t0 = time.perf_counter()
    pre = run_pretrain_stage(pcfg)
    pretrain_s = time.perf_counter() - t0
    dataset = build_dataset(pcfg, method_spec("supervised"))
    targets = FindingTargets(pcfg, dataset, torch.device("cpu"))
    epochs = math.ceil(tc.steps * tc.batch_size / len(dataset))
    y = crop_targets(targets, dataset, list(range(epochs)))
    share = y.mean(dim=0)
    fit = fresh_epoch_fit(run_dir, pcfg, targets, dataset, epochs)
    curve = [r["loss"] for r in pre["curve"]]
    probes = {}
    for name, ckpt in (("supervised", run_dir), ("random", None)):
        out = plan.work / f"probes_{name}" if ckpt is None else run_dir / "probes"
        res = run_probe_stage(ckpt, plan.pretrain_config("t3d", args.seed), cfg.probes, plan.caches["probe"],
                              plan.probe_findings, out, args.seed)  # fmt: skip
        probes[name] = {"lesion": res["lesion"]["strata"], "voxel_stats": res["lesion_voxel_stats"]["strata"],
                        "study": res["study"]["metrics"]["macro"]["auroc"], "scores": res["study_scores"]}  # fmt: skip
    sup, rand = (probes[n].pop("scores") for n in ("supervised", "random"))
    assert sup["ids"] == rand["ids"], "both encoders are probed on the same test studies"
    y, a, b = (np.asarray(v, dtype=float) for v in (sup["y"], sup["p"], rand["p"]))
    study_gain = paired_auroc(y, a[None], b[None], cfg.n_boot)
    head = head_on_probe_crops(run_dir, plan, cfg.probes, args.seed, cfg.probes.size_thresholds_mm)
    summary = {
        "revision": git_revision(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "train": {"steps": tc.steps, "batch_size": tc.batch_size, "lr": tc.lr, "sites": pcfg.crops.sites,
                  "crop": list(pcfg.crops.size), "studies": len(dataset), "seconds": round(pretrain_s, 1)},
        "finding_min_voxels": pcfg.data.finding_min_voxels,
        "local_findings": targets.local,
        "train_bce_first_window": curve[0] if curve else None,
        "train_bce_last_window": curve[-1] if curve else None,
        "train_bce_curve": curve,
        "base_rate": {c: float(v) for c, v in zip(targets.classes, share)},
        "base_rate_bce": float(binary_entropy(share).mean()),
        "target_crops": len(y),
        "fresh_epoch": fit,
        "lesion_probe": probes,
        "study_probe_gain": {k: study_gain[k] for k in ("mean", "low", "high")},
        "head_on_probe_crops": head,
    }  # fmt: skip
    write_json_atomic(Path(args.output), json.loads(json.dumps(summary, default=float)))
    print(json.dumps({k: summary[k] for k in ("train", "train_bce_last_window", "base_rate_bce")}, indent=1))
    print(json.dumps({"fresh_epoch": fit, "lesion": {k: v["lesion"] for k, v in probes.items()}}, indent=1))
    print(json.dumps({"head_on_probe_crops": head, "study_probe_gain": summary["study_probe_gain"]}, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main(sys.argv[1:]))
