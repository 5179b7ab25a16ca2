"""Ground-truth findings of pre-training studies as multi-label targets (the ``supervised`` control).

    ids, classes, y = read_findings("data/synth/ground_truth.jsonl")     # or a CT-RATE findings CSV
    # y: (N, L) float32 0/1, row i = study ids[i]

Two layouts: the ``ground_truth.jsonl`` of ``t3d synth`` (a study is positive for a finding type when any of its
findings has that type; classes in ``t3d.data.synthetic.findings.FINDINGS`` order, named as ``findings.csv`` names
them), or any findings CSV that ``t3d.data.labels.read_labels`` reads (CT-RATE ``multi_abnormality_labels``).

    local = finding_label_classes("data/synth/ground_truth.jsonl", classes)   # {"Liver lesion": 9, ...}

A finding with a label class of its own (a lesion, a fluid layer) can be a per-crop target: does the crop hold
voxels of that class. Organ-level findings (splenomegaly, steatosis) have none and stay study-level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from t3d.data.labels import read_labels
from t3d.data.synthetic.findings import CSV_COLUMNS, FINDINGS, LESION_LABELS


def read_findings(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(study ids, finding names, (N, L) float32 0/1 labels) from a ground-truth JSONL or a findings CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"findings file {path} does not exist; pass the ground_truth.jsonl of `t3d synth` or a findings CSV "
            "(CT-RATE multi_abnormality_labels layout)"
        )
    if path.suffix == ".jsonl":
        return _ground_truth(path)
    table = read_labels(path)
    return list(table.ids), list(table.classes), table.y


def _ground_truth(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    ids, rows = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "id" not in record or "findings" not in record:
            raise ValueError(f"{path} line {line_no}: expected t3d synth ground truth with 'id' and 'findings'")
        kinds = {f["type"] for f in record["findings"]}
        ids.append(str(record["id"]))
        rows.append([float(kind in kinds) for kind in FINDINGS])
    return ids, [CSV_COLUMNS[k] for k in FINDINGS], np.asarray(rows, dtype=np.float32).reshape(len(ids), len(FINDINGS))


def finding_label_classes(
    path: str | Path, classes: list[str], configured: dict[str, int] | None = None
) -> dict[str, int]:
    """Finding name -> label value, for the findings of ``classes`` that have a label class of their own.

    ``configured`` (``data.finding_labels``) wins; otherwise a ``ground_truth.jsonl`` of ``t3d synth`` gives the
    generator's lesion classes (``LESION_LABELS``) and a findings CSV gives none (every finding study-level)."""
    if configured:
        unknown = sorted(set(configured) - set(classes))
        if unknown:
            raise ValueError(
                f"data.finding_labels names findings that {path} does not have: {', '.join(unknown)}; "
                f"its findings are: {', '.join(classes)}"
            )
        return {name: int(configured[name]) for name in classes if name in configured}
    if Path(path).suffix == ".jsonl":
        return {CSV_COLUMNS[kind]: value for kind, value in LESION_LABELS.items() if CSV_COLUMNS[kind] in classes}
    return {}
