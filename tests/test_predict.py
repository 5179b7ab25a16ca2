import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from seg_helpers import write_nifti
from t3d.checkpoint import save_checkpoint
from t3d.cli import main
from t3d.config import ModelConfig, PreprocessConfig
from t3d.data.cache import StudyCache
from t3d.data.cases import SegCase, prepare_cache
from t3d.finetune.networks import SegSpec
from t3d.finetune.segdata import load_volume
from t3d.finetune.segeval import InferenceSetting, predict_volume
from t3d.predict import input_cases, to_source_grid

SOURCE_SHAPE = (30, 26, 12)
# LPS-oriented, anisotropic: i runs right -> left, j anterior -> posterior, 2.5 mm slices, off-centre origin.
LPS_AFFINE = np.array([[-0.8, 0.0, 0.0, 40.0], [0.0, -0.9, 0.0, 25.0], [0.0, 0.0, 2.5, -60.0], [0.0, 0.0, 0.0, 1.0]])
CUBE = (slice(6, 14), slice(15, 22), slice(3, 7))  # source voxels; deliberately off-centre in every axis
PREPROCESS = PreprocessConfig(spacing=(1.5, 1.5, 1.5), min_size=(32, 32, 32))
WINDOWS = ((-1000.0, 1000.0),)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An LPS, anisotropic CT-like NIfTI: air, a soft-tissue body and a bright (800 HU) cube."""
    root = tmp_path_factory.mktemp("src")
    image = np.full(SOURCE_SHAPE, -1000, dtype=np.int16)
    image[2:-2, 2:-2, :] = 40
    image[CUBE] = 800
    return write_nifti(image, root / "scan_lps.nii.gz", affine=LPS_AFFINE)


class ThresholdNet(nn.Module):
    """A "network" that labels voxels above 500 HU as class 1: a known segmentation to carry back."""

    def forward(self, x):
        fg = (x[:, :1] - 0.75) * 100.0  # window (-1000, 1000): 800 HU -> 0.9, soft tissue 40 HU -> 0.52
        return torch.cat([-fg, fg], dim=1)


def world_centroid(mask, affine):
    idx = np.argwhere(mask).mean(axis=0)
    return (affine @ np.append(idx, 1.0))[:3]


def test_predictions_land_on_the_source_grid_and_world_coordinates(source, tmp_path):
    keys = prepare_cache([SegCase("scan", source)], tmp_path / "cache", PREPROCESS)
    cache = StudyCache(tmp_path / "cache")
    meta = cache.meta(keys["scan"])
    assert tuple(meta.shape) != SOURCE_SHAPE  # reoriented, resampled and padded: the grids really differ
    setting = InferenceSetting(WINDOWS, (64, 32, 32), sw_batch_size=2, overlap=0.25)
    pred = predict_volume(ThresholdNet(), load_volume(cache, keys["scan"], WINDOWS), setting).numpy()
    back = to_source_grid(pred, meta)
    assert back.shape == SOURCE_SHAPE and back.dtype == np.uint8
    truth = np.zeros(SOURCE_SHAPE, bool)
    truth[CUBE] = True
    dice = 2 * (truth & (back == 1)).sum() / (truth.sum() + (back == 1).sum())
    assert dice > 0.85
    # Same place in the world (mm): within half of the coarsest voxel size.
    np.testing.assert_allclose(world_centroid(back == 1, LPS_AFFINE), world_centroid(truth, LPS_AFFINE), atol=1.25)


def write_seg_checkpoint(run_dir):
    spec = SegSpec(ModelConfig(encoder="resnet", preset="tiny"), PREPROCESS, WINDOWS, (64, 32, 32),
                   {0: "background", 1: "cube"})  # fmt: skip
    torch.manual_seed(0)
    state = {"kind": "t3d-seg", "model": spec.build().state_dict(), "spec": spec.as_dict(), "step": 1}
    save_checkpoint(state, run_dir, "best")
    return run_dir


def test_predict_cli_writes_niftis_with_the_source_geometry(source, tmp_path):
    run = write_seg_checkpoint(tmp_path / "seg")
    out = tmp_path / "pred"
    assert main(["predict", "seg", "--checkpoint", str(run), "--input", str(source), "--out", str(out)]) == 0
    written = nib.load(str(out / "scan_lps.nii.gz"))
    assert written.shape == SOURCE_SHAPE
    np.testing.assert_allclose(written.affine, LPS_AFFINE, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    assert written.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert row["id"] == "scan_lps" and row["prediction"].endswith("scan_lps.nii.gz")


def test_predict_reads_a_manifest_and_rejects_other_checkpoints(source, tmp_path, capsys):
    run = write_seg_checkpoint(tmp_path / "seg")
    manifest = source.parent / "list.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": source.name}) + "\n" + json.dumps({"image": source.name}))
    dupe = source.parent / "dupe.jsonl"
    dupe.write_text(json.dumps({"id": "a", "image": source.name}) + "\n" + json.dumps({"id": "a", "image": "b.nii"}))
    with pytest.raises(ValueError, match="repeated: a"):
        input_cases(dupe)
    out = tmp_path / "pred"
    assert main(["predict", "seg", "--checkpoint", str(run), "--input", str(manifest), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a.nii.gz", "scan_lps.nii.gz"]
    save_checkpoint({"model": {}, "config": {}}, tmp_path / "pre", "final")
    assert main(["predict", "seg", "--checkpoint", str(tmp_path / "pre"), "--input", str(source), "--out",
                 str(out)]) == 2  # fmt: skip
    assert "not a `t3d finetune seg` checkpoint" in capsys.readouterr().err
