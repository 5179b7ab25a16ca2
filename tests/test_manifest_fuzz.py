"""Property-based fuzz of the manifest readers (``hypothesis``, a bounded number of examples, derandomized).

Whatever the bytes, reading a manifest either gives studies or raises ``ManifestError`` naming the file; and a
manifest written by a correct CSV/JSONL writer reads back to the same ids and report text, whatever the text holds
(quotes, commas, newlines, tabs, non-ASCII).
"""

from __future__ import annotations

import csv
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t3d.data.manifest import ManifestError, read_manifest

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SUFFIXES = st.sampled_from(["m.csv", "m.tsv", "m.jsonl"])
# Text a report may hold: printable, quotes, separators and line breaks, a little non-ASCII.
REPORT = st.text(alphabet=st.sampled_from(list("abc XYZ019.,;:'\"\t\n\r-/()é°µ")), min_size=1, max_size=40).filter(
    lambda t: t.strip(" \t\n\r")
)
IDS = st.lists(st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), min_size=1, max_size=6, unique=True)


@FUZZ
@given(data=st.binary(max_size=400), name=SUFFIXES)
def test_any_bytes_read_or_raise_a_manifest_error(tmp_path, data, name):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        studies = read_manifest(path, root=tmp_path)
    except ManifestError as err:
        assert str(path) in str(err)
        return
    assert all(study.id and study.image for study in studies)


def _csv_text(ids: list[str], reports: list[str], delimiter: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)  # "\r\n" rows: cells with either character are quoted
    writer.writerow(["id", "image", "report"])
    for sid, report in zip(ids, reports):
        writer.writerow([sid, f"{sid}.nii.gz", report])
    return buffer.getvalue()


@FUZZ
@given(ids=IDS, data=st.data(), name=SUFFIXES)
def test_a_well_written_manifest_reads_back(tmp_path, ids, data, name):
    reports = [data.draw(REPORT) for _ in ids]
    path = tmp_path / name
    if name.endswith(".jsonl"):
        rows = [{"id": i, "image": f"{i}.nii.gz", "report": r} for i, r in zip(ids, reports)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        path.write_text(_csv_text(ids, reports, "\t" if name.endswith(".tsv") else ","), encoding="utf-8")
    try:
        studies = read_manifest(path, root=tmp_path)
    except ManifestError as err:
        # The only refusal allowed for a correct file: a report line that looks like a manifest row.
        assert "looks like another row" in str(err) and any(".nii.gz" in r for r in reports)
        return
    assert [s.id for s in studies] == ids
    assert [" ".join(s.report.split()) for s in studies] == [" ".join(r.split()) for r in reports]


@FUZZ
@given(ids=IDS, cut=st.integers(min_value=1, max_value=200))
def test_a_csv_cut_inside_a_quoted_report_never_loses_rows_silently(tmp_path, ids, cut):
    reports = [f'said "{i}", then\nmore' for i in ids]
    text = _csv_text(ids, reports, ",")
    quote = [n for n, ch in enumerate(text) if ch == '"']
    position = quote[cut % len(quote)]
    path = tmp_path / "m.csv"
    path.write_text(text[:position] + text[position + 1 :], encoding="utf-8")  # drop one quote character
    try:
        studies = read_manifest(path, root=tmp_path)
    except ManifestError as err:
        assert str(path) in str(err)
        return
    assert [s.id for s in studies] == ids  # read fully, or refused: never fewer studies without a word
