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


PLAIN = st.text(alphabet=st.sampled_from(list("abc XYZ019.;:-é")), min_size=1, max_size=20).filter(str.strip)


@FUZZ
@given(ids=IDS.filter(lambda ids: len(ids) >= 2), data=st.data())
def test_a_hand_edited_csv_with_a_stray_quote_never_loses_rows_silently(tmp_path, ids, data):
    """A careless edit opens a quote in one report and maybe closes one in a later report (before a delimiter or
    at the end of the line): read every row, or refuse the file -- never fewer studies without a word."""
    reports = [data.draw(PLAIN) for _ in ids]
    opened = data.draw(st.integers(0, len(ids) - 2))
    closed = data.draw(st.integers(opened + 1, len(ids) - 1))
    reports[opened] = '"' + reports[opened]
    if data.draw(st.booleans()):
        reports[closed] = reports[closed] + '"'
    extra = data.draw(st.sampled_from(["", ",x"]))  # a trailing column after the report, or none
    header = "id,image,report" + (",note" if extra else "")
    lines = [header] + [f"{i},{i}.nii.gz,{r}{extra}" for i, r in zip(ids, reports)]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        studies = read_manifest(path, root=tmp_path)
    except ManifestError as err:
        assert str(path) in str(err)
        return
    assert [s.id for s in studies] == ids
