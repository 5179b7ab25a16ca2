"""The segmentation control of the transfer benchmark: the encoder trained to segment the pre-training studies.

    scfg = seg_control_config(plan, seed)      # its SegConfig; writes <work>/prep/seg_control_dataset.json
    control_dataset(manifest, root, ids, seg_dataset, target)          # that MSD dataset.json: pre-training studies
    SEG_CONTROL in cfg.controls                                         # "supervised-seg"

The two controls answer different questions. ``supervised`` (ground-truth findings, per-crop BCE) is the reference
of what *finding-level* supervision, what a report says, teaches this encoder at the benchmark's budget.
``supervised-seg`` is the reference of the *benchmark*: the same encoder trained as a segmentation network
(``t3d finetune seg``, dense labels: organs and lesions) on the pre-training split, so its features hold whatever its
segmentation Dice (in its stage result) says they hold. A downstream metric that cannot tell it from ``random``
cannot see encoder content at this budget; one that can, can. Its downstream stages start from the segmentation run
(``t3d.pretrained.load_pretrained`` reads ``t3d finetune seg`` runs); it never sees the probe, fine-tuning or test
studies.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from t3d.data.cache import write_json_atomic
from t3d.data.manifest import read_manifest
from t3d.evaluate.studies import read_split
from t3d.finetune.config import SegConfig

SEG_CONTROL = "supervised-seg"
"""Name of the segmentation control in ``controls`` and in every table."""


def control_dataset(manifest: str, root: str | None, ids: list[str] | None, seg_dataset: str, target: Path) -> dict:
    """Write the MSD ``dataset.json`` the control trains on: ``training`` = the pre-training studies of ``manifest``
    (those in ``ids`` when given) with their label maps (the manifest's ``label`` column), ``labels`` and ``test`` =
    those of the benchmark's segmentation dataset (its test studies score the control's own segmentation)."""
    studies = read_manifest(manifest, root)
    if ids is not None:
        keep = set(ids)
        studies = [s for s in studies if s.id in keep]
    unlabelled = [s.id for s in studies if s.label is None]
    if not studies or unlabelled:
        what = f"no label map for {len(unlabelled)} of them (first: {unlabelled[0]})" if studies else "none of them"
        raise ValueError(
            f"the {SEG_CONTROL} control trains on label maps of the pre-training studies, and {manifest} has {what}; "
            f"add a 'label' column (segmentation map on the image grid) or remove {SEG_CONTROL} from controls"
        )
    desc = json.loads(Path(seg_dataset).read_text())
    desc["training"] = [{"image": str(s.image), "label": str(s.label)} for s in studies]
    desc["numTraining"] = len(studies)
    desc["description"] = f"{SEG_CONTROL} control: the pre-training studies of {manifest} with their label maps"
    write_json_atomic(target, desc)
    return {"training": len(studies), "test": len(desc.get("test") or [])}


def seg_control_config(plan, seed: int) -> SegConfig:
    """The control's training run: ``seg`` then ``seg_control`` settings with the pre-training seed, on the
    pre-training studies (``plan``: a ``transfer_plan.Plan``), the architecture and inputs of the ``random`` control."""
    d = plan.cfg.data
    target = plan.work / "prep" / "seg_control_dataset.json"
    ids = read_split(plan.splits, d.pretrain_split) if plan.splits and d.pretrain_split else None
    control_dataset(plan.pretrain_manifest, plan.pretrain_root, ids, plan.seg_dataset, target)
    out = plan.run_dir(SEG_CONTROL, seed) / "pretrain"
    paths = {"data": str(target), "out": str(out), "cache": str(plan.caches["seg_control"]), "fraction": 1.0}
    fields = {**plan.cfg.seg, **plan.cfg.seg_control}
    return replace(plan.downstream_config(SegConfig, fields, "random", seed, **paths), seed=seed)
