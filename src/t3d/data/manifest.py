"""Pre-training manifests: one row per study (image + report), read from JSONL or CSV (docs/method.md §1).

Accepted layouts::

    JSONL / CSV / TSV   id, image, report            (or findings and/or impression instead of report)
                        optional: label (segmentation map on the image grid), any other column (kept as extra)
    CT-RATE CSV         VolumeName, Findings_EN, Impressions_EN   (id = VolumeName without .nii.gz)

Relative paths resolve against the data root (default: the manifest's folder). Problems with the manifest as a whole
(unknown format, missing columns, duplicate ids, rows without id or image, malformed JSON) raise ``ManifestError``
naming the file, the lines and the fix; nothing is processed. Problems with one study (a path that escapes the data
root, an empty report, bytes that are not UTF-8) are recorded on the ``Study`` (``problem``) and quarantined by
preprocessing while the other studies go on.

CT-RATE image paths: the volumes ship nested as ``<split>/<split>_<patient>/<split>_<patient>_<scan>/<VolumeName>``.
A row resolves, in this order, to (1) ``root/VolumeName``, (2) that nested path under root, (3) the single file
named ``VolumeName`` anywhere under root (one directory walk per run, only when (1) and (2) miss; two matches are a
per-study problem). Otherwise it stays ``root/VolumeName`` and is quarantined as missing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CTRATE_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
KNOWN_COLUMNS = ("id", "image", "report", "findings", "impression", "label")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that failed UTF-8 decoding (surrogateescape)


class ManifestError(ValueError):
    """The manifest cannot be used as a whole; the message names the file, the lines and what to change."""


@dataclass
class Study:
    """One manifest row: a 3D image, its report and optionally a segmentation label."""

    id: str
    image: Path
    """Absolute path of the image file or DICOM series folder (symlinks not resolved)."""
    findings: str = ""
    impression: str = ""
    report: str = ""
    """Full report text: the ``report`` column, else findings and impression joined (whitespace normalised)."""
    label: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Other manifest columns, passed through to the cache index."""
    line: int = 0
    """1-based line of the row in the manifest (for messages)."""
    problem: str = ""
    """Non-empty when this study must be quarantined before reading it (the reason, for people)."""
    problem_kind: str = ""
    """Short category of ``problem`` used to count reasons in the summary."""


def read_manifest(path: str | Path, root: str | Path | None = None, label_key: str | None = None) -> list[Study]:
    """Read a JSONL/CSV/TSV manifest (or the CT-RATE reports CSV) into studies, in file order.

    ``root`` is the folder that relative image/label paths resolve against (default: the manifest's folder);
    ``label_key`` names the column holding the label path (default ``label`` when present).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    root = Path(root) if root else path.parent
    if not root.is_dir():
        raise ManifestError(f"data root {root} is not a folder; pass --root DIR that holds the images")
    rows = _read_rows(path)
    if not rows:
        raise ManifestError(f"manifest {path} has no rows; expected one row per study (id, image, report)")
    resolver = _PathResolver(root.absolute())
    columns = _columns(rows)
    if "VolumeName" in columns:
        _check_empty(path, rows, "VolumeName", "VolumeName")
        studies = [_ctrate_study(row, line, resolver) for line, row in rows]
    else:
        _check_columns(path, rows, columns, label_key)
        _check_empty(path, rows, "id", "image")
        studies = [_generic_study(row, line, resolver, label_key) for line, row in rows]
    _check_ids(path, studies)
    return studies


# ----------------------------------------------------------------------------------------------- parsing


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row dict) per non-blank row. Undecodable bytes survive as surrogates, flagged per study later."""
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix not in (".jsonl", ".ndjson", ".csv", ".tsv"):
        raise ManifestError(
            f"manifest {path}: unknown format '{suffix or path.name}'; use .jsonl (one JSON object per line) "
            "or .csv/.tsv with a header row"
        )
    text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path, text)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
    if not reader.fieldnames:
        raise ManifestError(f"manifest {path} is empty; expected a header row (id, image, report)")
    rows = []
    for row in reader:
        if None in row:  # more cells than header columns
            raise ManifestError(f"manifest {path} line {reader.line_num}: more cells than header columns")
        rows.append((reader.line_num, {k.strip(): v for k, v in row.items()}))
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) carry no study
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"manifest {path} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"manifest {path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _columns(rows: list[tuple[int, dict[str, Any]]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _check_columns(path: Path, rows: list, columns: list[str], label_key: str | None) -> None:
    missing = [c for c in ("id", "image") if c not in columns]
    if not any(c in columns for c in ("report", "findings", "impression")):
        missing.append("report (or findings/impression)")
    if label_key and label_key not in columns:
        missing.append(label_key)
    if missing:
        raise ManifestError(
            f"manifest {path}: missing column(s) {', '.join(missing)}; found columns: {', '.join(columns)}; "
            "expected id, image and report (or findings/impression), optionally label, "
            f"or the CT-RATE layout {', '.join(CTRATE_COLUMNS)}"
        )


def _check_empty(path: Path, rows: list, id_col: str, image_col: str) -> None:
    empty = [line for line, row in rows if not _text(row.get(id_col)) or not _text(row.get(image_col))]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        what = id_col if id_col == image_col else f"{id_col} or {image_col}"
        raise ManifestError(
            f"manifest {path}: {len(empty)} empty row(s) without {what} (line {shown}); "
            "fill them in or delete those rows"
        )


def _check_ids(path: Path, studies: list[Study]) -> None:
    lines: dict[str, list[int]] = {}
    for study in studies:
        lines.setdefault(study.id, []).append(study.line)
    duplicates = {k: v for k, v in lines.items() if len(v) > 1}
    if duplicates:
        shown = "; ".join(f"'{k}' on lines {', '.join(map(str, v))}" for k, v in list(duplicates.items())[:10])
        raise ManifestError(
            f"manifest {path}: {len(duplicates)} duplicate id(s): {shown}; every study needs a unique id "
            "(a repeated id makes it ambiguous which image belongs to which report)"
        )


# ----------------------------------------------------------------------------------------------- rows -> studies


def _generic_study(row: dict[str, Any], line: int, resolver: _PathResolver, label_key: str | None) -> Study:
    label_col = label_key or "label"
    study = Study(
        id=_text(row.get("id")),
        image=resolver.absolute(_text(row["image"])),
        findings=_text(row.get("findings")),
        impression=_text(row.get("impression")),
        report=_text(row.get("report")),
        label=resolver.absolute(_text(row[label_col])) if _text(row.get(label_col)) else None,
        extra={k: v for k, v in row.items() if k not in KNOWN_COLUMNS and k != label_col},
        line=line,
    )
    _finish(study, row, resolver)
    return study


def _ctrate_study(row: dict[str, Any], line: int, resolver: _PathResolver) -> Study:
    name = _text(row.get("VolumeName"))
    study = Study(
        id=re.sub(r"\.nii(\.gz)?$", "", name),
        image=resolver.ctrate(name),
        findings=_text(row.get("Findings_EN")),
        impression=_text(row.get("Impressions_EN")),
        extra={k: v for k, v in row.items() if k not in CTRATE_COLUMNS},
        line=line,
    )
    _finish(study, row, resolver)
    return study


def _finish(study: Study, row: dict[str, Any], resolver: _PathResolver) -> None:
    """Compose the report and record per-study problems (first one wins)."""
    if not study.report:
        study.report = "\n".join(part for part in (study.findings, study.impression) if part)
    problems = []
    bad = [k for k, v in row.items() if isinstance(v, str) and _SURROGATE.search(v)]
    if bad:
        problems.append(
            (
                f"line {study.line}: bytes that are not UTF-8 in column(s) {', '.join(bad)} (e.g. latin-1); "
                "re-encode the manifest as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.csv > out.csv)",
                "not UTF-8",
            )
        )
        study.id = _SURROGATE.sub("\ufffd", study.id)
        study.image = Path(_SURROGATE.sub("\ufffd", str(study.image)))  # printable in quarantine.json
        for name in ("findings", "impression", "report"):
            setattr(study, name, _SURROGATE.sub("\ufffd", getattr(study, name)))
    for kind, path in (("image", study.image), ("label", study.label)):
        if path is not None and not resolver.inside(path):
            problems.append(
                (
                    f"{kind} path {path} is outside the data root {resolver.root} (via '..', an absolute path or a "
                    "symlink); move the file under the root or pass --root to a folder that holds it",
                    "outside data root",
                )
            )
    if not study.report.strip():
        problems.append(("empty report: no report, findings or impression text", "empty report"))
    if resolver.ambiguous.get(study.image):
        problems.append((resolver.ambiguous[study.image], "ambiguous path"))
    if problems and not study.problem:
        study.problem, study.problem_kind = problems[0]


def _text(value: Any) -> str:
    """A cell as stripped text with runs of spaces/tabs collapsed (None/NaN -> '')."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return re.sub(r"[ \t]+", " ", str(value)).strip()


class _PathResolver:
    """Turns manifest paths into absolute paths under the data root; checks that they stay inside it."""

    def __init__(self, root: Path):
        self.root = root
        self._real_root = root.resolve()
        self._names: dict[str, list[Path]] | None = None
        self.ambiguous: dict[Path, str] = {}

    def absolute(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        return Path(os.path.normpath(path if path.is_absolute() else self.root / path))

    def inside(self, path: Path) -> bool:
        """True when ``path`` (symlinks resolved) lies under the data root."""
        return path.resolve().is_relative_to(self._real_root)

    def ctrate(self, name: str) -> Path:
        direct = self.root / name
        if direct.exists():
            return direct
        parts = re.sub(r"\.nii(\.gz)?$", "", name).split("_")
        if len(parts) == 4:  # train_1_a_1 -> train/train_1/train_1_a/train_1_a_1.nii.gz
            nested = self.root / parts[0] / "_".join(parts[:2]) / "_".join(parts[:3]) / name
            if nested.exists():
                return nested
        matches = self._walk().get(name, [])
        if len(matches) > 1:
            self.ambiguous[direct] = f"{len(matches)} files named {name} under {self.root}: {matches[0]}, {matches[1]}"
        return matches[0] if len(matches) == 1 else direct

    def _walk(self) -> dict[str, list[Path]]:
        if self._names is None:
            self._names = {}
            for folder, _, files in os.walk(self.root):
                for name in files:
                    self._names.setdefault(name, []).append(Path(folder) / name)
        return self._names
