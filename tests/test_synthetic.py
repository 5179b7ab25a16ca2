"""The synthetic CT + report benchmark: determinism, geometry, HU, labels, reports vs ground truth, files, CLI."""

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from t3d.cli import main
from t3d.data.synthetic import CSV_COLUMNS, FINDINGS, LABEL_NAMES, generate_dataset, sample_study
from t3d.data.synthetic.anatomy import ORGAN_LABELS
from t3d.data.synthetic.findings import FOCAL, NORMAL_SHARE, sample_plan
from t3d.data.synthetic.reports import NEGATIONS
from t3d.data.synthetic.study import PRESETS, make_grid

SEED = 3
N_STUDIES = 6

# Independent reading of the report text: which finding type a sentence talks about, and whether it negates it.
KEYWORDS = {
    "liver_lesion": r"\blesions?\b",
    "renal_cyst": r"\bcysts?\b",
    "lung_nodule": r"\bnodules?\b",
    "pleural_effusion": r"\beffusions?\b",
    "splenomegaly": r"\bspleen\b|\bsplenic\b|\bsplenomegaly\b",
    "hepatic_steatosis": r"\bsteatosis\b|\bfatty\b",
    "kidney_stone": r"\bcalcul\w*|\bstones?\b|\bnephrolithiasis\b",
}
NEGATION = r"\b(no|not|without|normal|unremarkable)\b"
SIZE = r"(\d+(?:\.\d+)?) (mm|cm)\b"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "a"
    summary = generate_dataset(out, N_STUDIES, SEED, preset="tiny", workers=1, progress=False)
    return out, summary


@pytest.fixture(scope="module")
def studies():
    """Forty tiny studies in memory: enough for every finding type to occur several times."""
    return [sample_study(11, i, "tiny") for i in range(40)]


def _ground_truth(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "ground_truth.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}


def _sentences(text: str) -> list[str]:
    text = re.sub(r"^(\d+\.|[A-Z][a-z]+(?: and [a-z]+)?:) ", "", text, flags=re.M)  # list numbers, headings
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def _sizes_mm(text: str) -> list[float]:
    return [float(v) * (10 if unit == "cm" else 1) for v, unit in re.findall(SIZE, text)]


def _centroid_world(label: np.ndarray, value: int, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
    out, _ = dataset
    generate_dataset(tmp_path / "b", N_STUDIES, SEED, preset="tiny", workers=2, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) == 3 * N_STUDIES + 7
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_different_seed_or_index_gives_a_different_study():
    a, b, c = sample_study(SEED, 0, "tiny"), sample_study(SEED + 1, 0, "tiny"), sample_study(SEED, 1, "tiny")
    assert not np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    again = sample_study(SEED, 0, "tiny")
    assert np.array_equal(a.image, again.image) and np.array_equal(a.label, again.label)
    assert a.report.findings == again.report.findings and a.findings == again.findings


def test_written_nifti_has_ras_affine_spacing_and_dtypes(dataset):
    out, _ = dataset
    preset = PRESETS["tiny"]
    image = nib.load(out / "images" / "synth_0000.nii.gz")
    label = nib.load(out / "labels" / "synth_0000.nii.gz")
    for img, dtype in ((image, np.int16), (label, np.uint8)):
        assert img.shape == preset.shape
        assert img.get_data_dtype() == dtype
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms(), preset.spacing)
        np.testing.assert_allclose(np.diag(img.affine)[:3], preset.spacing)
        np.testing.assert_allclose(img.affine, make_grid("tiny").affine)
    centre = image.affine @ np.array([*((np.array(preset.shape) - 1) / 2), 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-6)  # volume centred on the world origin
    hu = np.asarray(image.dataobj)
    assert hu.dtype == np.int16 and hu.min() >= -1024 and hu.max() <= 3071


def test_spacing_override_keeps_the_field_of_view():
    grid = make_grid("tiny", (2.5, 2.5, 3.0))
    assert grid.shape == (96, 96, 64) and grid.spacing == (2.5, 2.5, 3.0)
    study = sample_study(0, 0, "tiny", spacing=(2.5, 2.5, 3.0))
    assert study.image.shape == (96, 96, 64)
    with pytest.raises(ValueError, match="three positive"):
        make_grid("tiny", (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        make_grid("huge")


def test_hu_is_plausible_per_organ(studies):
    for s in studies:
        img, lab = s.image, s.label
        steatosis = any(f["type"] == "hepatic_steatosis" for f in s.findings)
        liver = img[lab == 1].mean()
        assert (-25 <= liver <= 35) if steatosis else (40 <= liver <= 80), liver
        assert img[(lab == 6) | (lab == 7)].mean() < -700
        assert img[lab == 8].mean() > 300
        assert 15 <= np.median(img[lab == 2]) <= 100
        assert 10 <= np.median(img[(lab == 3) | (lab == 4)]) <= 200
        assert img[0, 0, :].mean() < -950  # air outside the body
        for value, lo, hi in ((10, -40, 45), (12, 300, 1200), (13, -30, 50)):  # cyst, stone, effusion
            if (lab == value).any():
                assert lo <= np.median(img[lab == value]) <= hi, (LABEL_NAMES[value], np.median(img[lab == value]))


def test_labels_present_and_lesion_labels_match_ground_truth(studies):
    for s in studies:
        values = set(np.unique(s.label).tolist())
        assert set(range(1, 9)) <= values  # every organ in every study, whatever the preset
        assert values <= set(LABEL_NAMES)
        for value in range(9, 14):
            rows = [f for f in s.findings if f["label"] == value]
            assert (value in values) == bool(rows)
            assert int((s.label == value).sum()) == sum(f["voxels"] for f in rows)
            for f in rows:
                assert s.label[tuple(f["centre_voxel"])] == value


def test_ras_laterality_of_organs_and_findings(studies):
    """RAS+ world (NIfTI / nibabel / MONAI): +x is the patient's RIGHT, +y anterior, +z superior."""
    checked = set()
    for s in studies:
        lab, aff = s.label, s.affine
        c = {v: _centroid_world(lab, v, aff) for v in range(1, 9)}
        assert c[4][0] > c[8][0] > c[3][0]  # right kidney at +x (patient right), left kidney at -x
        assert c[7][0] > c[6][0] and c[1][0] > c[8][0] > c[2][0]  # right lung, liver at +x; left lung, spleen at -x
        assert c[6][2] > c[3][2] and c[7][2] > c[4][2]  # lungs above kidneys (+z superior)
        assert c[5][0] < c[8][0] and c[5][1] > c[8][1]  # aorta left of (-x) and anterior to the spine
        liver_x = aff[0, 0] * np.flatnonzero(np.isin(lab, (1, 9)).any(axis=(1, 2))) + aff[0, 3]  # with its lesions
        for f in s.findings:
            x = (aff @ np.array([*f["centre_voxel"], 1.0]))[0]
            if f["side"] is not None:
                assert (x < c[8][0]) == (f["side"] == "left"), f  # patient left = smaller world x
                checked.add(f["type"])
            if f["type"] == "liver_lesion":  # Cantlie line at 60 % of the liver's width from its right (+x) edge
                from_right = (liver_x.max() - x) / np.ptp(liver_x)
                if abs(from_right - 0.6) > 0.05:  # clear of the line (voxel rounding)
                    assert (f["lobe"] == "right") == (from_right < 0.6), (f, from_right)
                    checked.add("liver_lobe")
    assert checked == {"renal_cyst", "kidney_stone", "lung_nodule", "pleural_effusion", "liver_lobe"}


def test_written_nifti_puts_organs_and_sided_findings_on_the_patient_side(dataset):
    """What a viewer shows: through each file's own affine the liver, right kidney and right lung lie at larger
    RAS x (patient right), and every sided finding lies in the organ of the side its report names."""
    out, _ = dataset
    gt = _ground_truth(out)
    for sid, row in gt.items():
        img = nib.load(out / "labels" / f"{sid}.nii.gz")
        lab = np.asarray(img.dataobj)
        x = {v: _centroid_world(lab, v, img.affine)[0] for v in (1, 2, 3, 4, 6, 7)}
        assert x[1] > x[2] and x[4] > x[3] and x[7] > x[6], sid
        for f in row["findings"]:
            if f["side"] is None:
                continue
            organ = "lung" if f["organ"] in ("pleura", f"lung_{f['side']}") else "kidney"
            assert f["organ"] in ("pleura", f"{organ}_{f['side']}"), f
            opposite = "right" if f["side"] == "left" else "left"
            same, other = ORGAN_LABELS[f"{organ}_{f['side']}"], ORGAN_LABELS[f"{organ}_{opposite}"]
            fx = (img.affine @ np.array([*f["centre_voxel"], 1.0]))[0]
            assert abs(fx - x[same]) < abs(fx - x[other]), (sid, f)


def test_report_states_every_positive_finding_and_negates_absent_ones(studies):
    seen = set()
    for s in studies:
        present = {f["type"] for f in s.findings}
        seen |= present
        sentences = _sentences(s.report.findings)
        assert sentences == [x.text for x in s.report.sentences]
        for kind in FINDINGS:
            about = [t for t in sentences if re.search(KEYWORDS[kind], t, re.I)]
            negated = [t for t in about if re.search(NEGATION, t, re.I)]
            if kind in present:
                assert about and not negated, (kind, s.report.findings)
            else:
                assert negated and negated == about, (kind, s.report.findings)
        impression = s.report.impression
        if present:
            assert all(re.search(KEYWORDS[k], impression, re.I) for k in present), impression
            assert not re.search(NEGATION, impression, re.I)
        else:
            assert re.search(r"no acute|unremarkable", impression, re.I), impression
    assert seen == set(FINDINGS)
    assert any(not s.findings for s in studies)


def test_report_sizes_sides_and_locations_match_ground_truth(studies):
    for s in studies:
        gt = s.findings
        for sent in s.report.sentences + s.report.impression_sentences:
            refs = [gt[i] for i in sent.refs]
            for mm in _sizes_mm(sent.text):  # every size stated is one of the described findings' (whole mm)
                assert any(abs(mm - np.floor(r["size_mm"] + 0.5)) < 1e-6 for r in refs), (sent.text, refs)
            sides = {r["side"] for r in refs} - {None}
            if sides:
                lower = sent.text.lower()
                stated = {x for x in ("left", "right") if x in lower or "bilateral" in lower}
                assert stated == sides, (sent.text, sides)
            if len(refs) == 1 and sent in s.report.sentences and refs[0]["location"]:
                r = refs[0]
                where = [r["location"]] if r["type"] != "liver_lesion" else [r["location"], f"{r['lobe']} "]
                assert any(w.lower() in sent.text.lower() for w in where), (sent.text, r["location"])
        for kind in FOCAL:  # the largest lesion of each type is measured in FINDINGS
            sizes = [f["size_mm"] for f in gt if f["type"] == kind]
            if sizes:
                stated = [mm for t in s.report.sentences if kind in t.kinds for mm in _sizes_mm(t.text)]
                assert any(abs(mm - np.floor(max(sizes) + 0.5)) < 1e-6 for mm in stated), (kind, s.report.findings)


def test_report_text_leaks_nothing_but_sizes_and_attenuation(studies):
    for s in studies:
        for text in (s.report.findings, s.report.impression):
            assert "synth" not in text and "label" not in text.lower() and "seed" not in text.lower()
            rest = re.sub(r"^\d+\. ", "", text, flags=re.M)
            rest = re.sub(r"-?\d+(\.\d+)? (mm|cm|HU)\b", "", rest)
            assert not re.search(r"\d", rest), text


def test_small_lesion_share_on_the_small_preset():
    """A 4x-downsampled volume keeps nothing under 4 voxels across; a good share of lesions are that small."""
    studies = [sample_study(0, i, "small") for i in range(20)]
    spacing = max(PRESETS["small"].spacing[:2])
    focal = [f for s in studies for f in s.findings if f["type"] in FOCAL]
    across = np.array([f["size_mm"] / spacing for f in focal])
    assert len(focal) >= 15
    assert (across < 4).mean() > 0.3  # small lesions a downsampled method loses
    assert (across >= 4).any()  # and larger ones it can still see
    assert all(f["voxels"] >= 1 for f in focal)


def test_prevalence_and_normal_share():
    rng = np.random.default_rng(0)
    plans = [sample_plan(rng) for _ in range(3000)]
    normal = np.mean([not p.present for p in plans])
    assert abs(normal - NORMAL_SHARE) < 0.03
    for kind in FINDINGS:
        assert 0.15 <= np.mean([kind in p.present for p in plans]) <= 0.35, kind
    assert set(NEGATIONS) == set(FINDINGS)


def test_findings_csv_matches_ground_truth(dataset):
    out, summary = dataset
    gt = _ground_truth(out)
    with open(out / "findings.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["VolumeName", *CSV_COLUMNS.values()]
    assert [r["VolumeName"] for r in rows] == [f"{i}.nii.gz" for i in sorted(gt)]
    for row in rows:
        present = {f["type"] for f in gt[row["VolumeName"].removesuffix(".nii.gz")]["findings"]}
        assert {k for k, col in CSV_COLUMNS.items() if row[col] == "1"} == present
        assert all(row[col] in ("0", "1") for col in CSV_COLUMNS.values())
    assert summary["normal"] == sum(r["normal"] for r in gt.values())
    assert summary["findings"] == {k: sum(r[CSV_COLUMNS[k]] == "1" for r in rows) for k in FINDINGS}


def test_splits_are_disjoint_complete_and_match_the_manifests(dataset):
    out, _ = dataset
    splits = json.loads((out / "splits.json").read_text())
    ids = [f"synth_{i:04d}" for i in range(N_STUDIES)]
    assert sorted(splits["pretrain"] + splits["finetune"] + splits["test"]) == ids
    assert all(splits[k] for k in ("pretrain", "finetune", "test"))
    pretrain = [json.loads(line) for line in (out / "pretrain.jsonl").read_text().splitlines()]
    assert [r["id"] for r in pretrain] == splits["pretrain"]
    for r in pretrain:
        assert set(r) == {"id", "image", "label", "findings", "impression"} and (out / r["image"]).is_file()
        assert (out / r["label"]).is_file()
        assert r["findings"] and r["impression"]
    reports = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert {r["id"]: r["split"] for r in reports} == {i: k for k, v in splits.items() for i in v}


def test_dataset_json_is_a_valid_msd_datalist(dataset):
    from monai.data import load_decathlon_datalist

    out, _ = dataset
    meta = json.loads((out / "dataset.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    assert meta["labels"] == {str(k): v for k, v in LABEL_NAMES.items()}
    assert meta["numTraining"] == len(meta["training"]) == len(splits["finetune"])
    assert [Path(e["image"]).name for e in meta["training"]] == [f"{i}.nii.gz" for i in splits["finetune"]]
    assert [Path(e["label"]).name for e in meta["test"]] == [f"{i}.nii.gz" for i in splits["test"]]
    for entry in load_decathlon_datalist(out / "dataset.json", True, "training", base_dir=out):
        assert Path(entry["image"]).is_file() and Path(entry["label"]).is_file()
        label = np.asarray(nib.load(entry["label"]).dataobj)
        assert label.dtype == np.uint8 and set(range(1, 9)) <= set(np.unique(label).tolist())


def test_cli_runs_resumes_and_refuses_foreign_folders(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["synth", "--out", str(out), "--num-studies", "3", "--seed", "1", "--preset", "tiny"]
    assert main(args) == 0
    assert "3 generated, 0 kept" in capsys.readouterr().out
    first = (out / "images" / "synth_0001.nii.gz").read_bytes()
    (out / "meta" / "synth_0001.json").unlink()  # as if the run had been killed before finishing this study
    assert main(args) == 0
    assert "1 generated, 2 kept" in capsys.readouterr().out
    assert (out / "images" / "synth_0001.nii.gz").read_bytes() == first
    assert main([*args[:-4], "--seed", "2", "--preset", "tiny"]) == 2
    assert "other settings (seed=1 not 2)" in capsys.readouterr().err
    assert main([*args[:-4], "--seed", "2", "--preset", "tiny", "--overwrite"]) == 0
    assert (out / "images" / "synth_0001.nii.gz").read_bytes() != first
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["synth", "--out", str(foreign), "--num-studies", "2", "--preset", "tiny"]) == 2
    assert "not a `t3d synth` output" in capsys.readouterr().err
    assert main(["synth", "--out", str(foreign), "--num-studies", "2", "--preset", "tiny", "--overwrite"]) == 0
    assert (foreign / "notes.txt").read_text() == "keep me"
