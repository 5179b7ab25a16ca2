"""Manifest reading: JSONL/CSV/CT-RATE layouts, path resolution under the data root, errors for people."""

from __future__ import annotations

import json
import os

import pytest

from studyfiles import write_jsonl
from t3d.data.manifest import ManifestError, read_manifest


def test_jsonl_rows_resolve_against_manifest_folder(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "image": "img/a.nii.gz", "report": "  Normal   chest.  ", "site": "x"},
            {"id": 7, "image": "img/b.nii.gz", "findings": "Nodule.", "impression": "Follow up."},
        ],
    )
    (tmp_path / "m.jsonl").write_text(path.read_text() + "\n\n")  # trailing blank lines are fine
    a, b = read_manifest(path)
    assert a.image == tmp_path / "img" / "a.nii.gz" and a.image.is_absolute()
    assert a.report == "Normal chest." and a.extra == {"site": "x"} and a.problem == ""
    assert b.id == "7" and b.report == "Nodule.\nFollow up." and (b.findings, b.impression) == ("Nodule.", "Follow up.")
    assert (a.line, b.line) == (1, 2)


def test_csv_with_label_column_and_explicit_root(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "m.csv").write_text('id,image,label,findings\ns1,ct/s1.nii.gz,seg/s1.nii.gz,"Liver lesion, 9 mm."\n')
    (study,) = read_manifest(tmp_path / "m.csv", root=data)
    assert study.image == data / "ct" / "s1.nii.gz" and study.label == data / "seg" / "s1.nii.gz"
    assert study.findings == "Liver lesion, 9 mm." and study.report == "Liver lesion, 9 mm."
    (study,) = read_manifest(tmp_path / "m.csv", root=data, label_key="label")
    assert study.label is not None
    with pytest.raises(ManifestError, match="missing column.*mask"):
        read_manifest(tmp_path / "m.csv", label_key="mask")


def test_ctrate_layout_nested_direct_and_searched(tmp_path):
    root = tmp_path / "ctrate"
    nested = root / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz"
    direct = root / "valid_2_a_1.nii.gz"
    elsewhere = root / "odd" / "place" / "scan3.nii.gz"
    for p in (nested, direct, elsewhere):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    csv = tmp_path / "train_reports.csv"
    csv.write_text(
        "VolumeName,ClinicalInformation_EN,Findings_EN,Impressions_EN\n"
        "train_1_a_1.nii.gz,Cough.,Lungs clear.,Normal.\n"
        "valid_2_a_1.nii.gz,,Effusion.,\n"
        "scan3.nii.gz,,Nodule.,Nodule.\n"
        "train_9_a_1.nii.gz,,Absent file.,\n"
    )
    studies = read_manifest(csv, root=root)
    assert [s.id for s in studies] == ["train_1_a_1", "valid_2_a_1", "scan3", "train_9_a_1"]
    assert [s.image for s in studies[:3]] == [nested, direct, elsewhere]
    assert studies[3].image == root / "train_9_a_1.nii.gz"  # reported missing by preprocessing
    assert studies[0].findings == "Lungs clear." and studies[0].impression == "Normal."
    assert studies[0].extra == {"ClinicalInformation_EN": "Cough."}


def test_ctrate_two_files_with_one_name_is_a_study_problem(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x_1.nii.gz").write_bytes(b"x")
    (tmp_path / "r.csv").write_text("VolumeName,Findings_EN,Impressions_EN\nx_1.nii.gz,Text.,\n")
    (study,) = read_manifest(tmp_path / "r.csv")
    assert study.problem_kind == "ambiguous path" and "2 files named x_1.nii.gz" in study.problem


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("m.txt", "id,image,report\n", "unknown format '.txt'"),
        ("m.csv", "id,path,text\na,b,c\n", r"missing column\(s\) image, report.*found columns: id, path, text"),
        ("m.csv", "id,image,report\na,a.nii,x\n,,\n", "empty row.*line 3"),
        ("m.jsonl", '{"id": "a", "image": "a.nii", "report": "x"}\n{"id": \n', "line 2: not valid JSON"),
        ("m.jsonl", '["a", "a.nii"]\n', "line 1: expected a JSON object"),
        ("m.csv", "", "is empty|no rows"),
        (
            "m.jsonl",
            "\n".join(json.dumps({"id": i, "image": f"{i}.nii", "report": "r"}) for i in ["a", "b", "a", "b", "c"]),
            r"2 duplicate id\(s\): 'a' on lines 1, 3; 'b' on lines 2, 4",
        ),
    ],
)
def test_manifest_errors_name_the_problem(tmp_path, name, content, pattern):
    (tmp_path / name).write_text(content)
    with pytest.raises(ManifestError, match=pattern):
        read_manifest(tmp_path / name)


def test_missing_manifest_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


def test_non_utf8_row_is_a_study_problem_naming_line(tmp_path):
    raw = b"id,image,report\na,a.nii.gz,Fine.\nb,b.nii.gz," + "Opacité basale.".encode("latin-1") + b"\n"
    (tmp_path / "m.csv").write_bytes(raw)
    a, b = read_manifest(tmp_path / "m.csv")
    assert a.problem == ""
    assert b.problem_kind == "not UTF-8"
    assert "line 3" in b.problem and "report" in b.problem and "re-encode" in b.problem
    assert "Opacit" not in b.problem  # report text is patient data: never echoed


def test_paths_escaping_the_root_are_study_problems(tmp_path):
    root = tmp_path / "root"
    (root / "ok").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.nii.gz").write_bytes(b"x")
    os.symlink(outside / "x.nii.gz", root / "link.nii.gz")
    os.symlink(root / "ok", root / "inner")  # a link that stays inside is fine
    rows = [
        {"id": "dotdot", "image": "../outside/x.nii.gz", "report": "r"},
        {"id": "absolute", "image": str(outside / "x.nii.gz"), "report": "r"},
        {"id": "symlink", "image": "link.nii.gz", "report": "r"},
        {"id": "label", "image": "ok/a.nii.gz", "label": "../../etc/passwd", "report": "r"},
        {"id": "inside", "image": str(root / "inner" / "a.nii.gz"), "report": "r"},
    ]
    studies = {s.id: s for s in read_manifest(write_jsonl(tmp_path / "m.jsonl", rows), root=root)}
    for sid in ("dotdot", "absolute", "symlink", "label"):
        assert studies[sid].problem_kind == "outside data root", sid
        assert "outside the data root" in studies[sid].problem and "--root" in studies[sid].problem
    assert studies["inside"].problem == ""


def test_empty_report_is_a_study_problem(tmp_path):
    rows = [
        {"id": "a", "image": "a.nii", "findings": "", "impression": "  "},
        {"id": "b", "image": "b.nii", "report": "x"},
    ]
    a, b = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
    assert a.problem_kind == "empty report" and b.problem == ""
