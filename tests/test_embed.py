"""`t3d embed`: image / feature / text embeddings of a manifest with an id index."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cls_helpers import synth_dataset, write_checkpoint
from t3d.cli import main
from t3d.data.tiles import TiledCropDataset
from t3d.evaluate.joint import image_embeddings, load_joint, study_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    return {
        "data": synth_dataset(root / "data", num_studies=8),
        "t3d-crops": write_checkpoint(root / "ck_t3d", "t3d-crops"),
        "vssl": write_checkpoint(root / "ck_vssl", "vssl"),
        "root": root,
    }


def _embed(tiny, method: str, out_name: str, extra=()):
    out = tiny["root"] / out_name
    args = ["embed", "--checkpoint", str(tiny[method]), "--manifest", str(tiny["data"] / "reports.jsonl")]
    assert main(args + ["--out", str(out), "--workers", "0", "--max-crops", "2", *extra]) == 0
    return out


def test_embed_writes_aligned_image_feature_and_text_embeddings(tiny, capsys):
    out = _embed(tiny, "t3d-crops", "emb_t3d")
    assert "8 studies" in capsys.readouterr().out
    ids = json.loads((out / "ids.json").read_text())
    manifest_ids = [json.loads(line)["id"] for line in (tiny["data"] / "reports.jsonl").read_text().splitlines()]
    assert ids == manifest_ids
    image, feats, text = (np.load(out / f"{n}.npy") for n in ("image", "features", "text"))
    assert image.shape == (8, 16) and text.shape == (8, 16) and feats.shape == (8, 128)
    assert image.dtype == np.float32 and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(r, 5)) for r in image}) == 8  # studies differ
    with (out / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ids and all(r["has_text"] == "1" for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "t3d-crops" and meta["image_dim"] == 16 and meta["text"] is True


def test_image_embedding_is_the_models_study_embedding_of_grid_crops(tiny):
    from t3d.data.grid import GridCropDataset
    from t3d.evaluate.joint import load_joint

    out = tiny["root"] / "emb_t3d"
    if not out.is_dir():
        out = _embed(tiny, "t3d-crops", "emb_t3d")
    jm = load_joint(tiny["t3d-crops"], device=torch.device("cpu"))
    ds = GridCropDataset(out / "cache", jm.cfg.crops.size, jm.cfg.crops.windows, max_crops=2)
    item = ds[0]
    with torch.no_grad():
        pooled = jm.model.encoder.pool(jm.model.encoder.forward_features(item["crops"]))  # (K, C)
        expected = jm.model.align_head(pooled[None])[0].numpy()  # t3d-crops: the study head over the pooled crops
    row = json.loads((out / "ids.json").read_text()).index(item["id"])
    np.testing.assert_allclose(np.load(out / "image.npy")[row], expected, atol=1e-5)


def test_embed_without_text_head_writes_no_text(tiny):
    out = _embed(tiny, "vssl", "emb_vssl")
    assert not (out / "text.npy").exists()
    assert np.load(out / "image.npy").shape == (8, 16)
    assert json.loads((out / "meta.json").read_text())["text"] is False


def test_embed_of_one_split(tiny):
    out = _embed(tiny, "vssl", "emb_split", ["--splits", str(tiny["data"] / "splits.json"), "--split", "test"])
    want = json.loads((tiny["data"] / "splits.json").read_text())["test"]
    assert sorted(json.loads((out / "ids.json").read_text())) == sorted(want)


def test_tiled_checkpoint_embeds_with_the_training_tiles_and_pooling(tiny):
    """A tiled method's study embedding in ``embed`` / evaluation is the training function: the checkpoint's tile
    grid (not ``--max-crops``) and its attention pooling, exactly as ``TiledCropDataset`` + the model compute it."""
    tiny["t3d"] = write_checkpoint(tiny["root"] / "ck_tiles", "t3d")
    out = _embed(tiny, "t3d", "emb_tiles")
    jm = load_joint(tiny["t3d"], device=torch.device("cpu"))
    training = TiledCropDataset(out / "cache", jm.cfg.crops, jm.cfg.tiles)
    ids = json.loads((out / "ids.json").read_text())
    image = np.load(out / "image.npy")
    u_eval, eval_ids = image_embeddings(jm, study_dataset(jm.cfg, jm.spec, out / "cache", ids, max_crops=1))
    assert eval_ids == ids
    for index in (0, 5):
        item = training[index]
        assert int(item["tile_mask"].sum()) > 1  # more than max_crops=1 above: the checkpoint's grid wins
        with torch.no_grad():
            u = jm.model.tile_study_outputs(default_collate([item]))["study_emb"][0]
        row = ids.index(item["id"])
        np.testing.assert_allclose(image[row], u.numpy(), atol=1e-5)
        np.testing.assert_allclose(u_eval[row].numpy(), u.numpy(), atol=1e-5)


def test_sentence_checkpoint_exports_what_its_score_reads(tiny):
    """An ``align: sentence`` checkpoint never trained ``u`` against a report: ``embed`` writes every region and
    sentence embedding, from which the evaluation's sentence scores follow exactly, and their mean directions."""
    from t3d.evaluate.joint import region_embeddings, sentence_embeddings, sentence_scores
    from t3d.evaluate.studies import report_texts

    tiny["t3d-sentence"] = write_checkpoint(tiny["root"] / "ck_sentence", "t3d-sentence")
    out = _embed(tiny, "t3d-sentence", "emb_sentence")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["scores"] == "sentence" and {"regions.npy", "sentences.npy"} <= set(meta["files"])
    ids = json.loads((out / "ids.json").read_text())
    regions, region_rows = np.load(out / "regions.npy"), np.load(out / "region_rows.npy")
    sent, sent_rows = np.load(out / "sentences.npy"), np.load(out / "sentence_rows.npy")
    assert set(region_rows) == set(sent_rows) == set(range(len(ids)))  # every study has regions and a report
    np.testing.assert_allclose(np.linalg.norm(regions, axis=1), 1.0, atol=1e-5)
    image, text = np.load(out / "image.npy"), np.load(out / "text.npy")
    for row in (0, 3):
        mean = regions[region_rows == row].mean(axis=0)
        np.testing.assert_allclose(image[row], mean / np.linalg.norm(mean), atol=1e-5)
        mean = sent[sent_rows == row].mean(axis=0)
        np.testing.assert_allclose(text[row], mean / np.linalg.norm(mean), atol=1e-5)

    jm = load_joint(tiny["t3d-sentence"], device=torch.device("cpu"))
    expected_regions, got = region_embeddings(jm, study_dataset(jm.cfg, jm.spec, out / "cache", ids))
    _, reports = report_texts(out / "cache", jm.cfg.text.sections, ids)
    expected = sentence_scores(expected_regions, *sentence_embeddings(jm, reports, out / "cache" / "text"), len(ids))
    from_files = sentence_scores(
        [torch.from_numpy(regions[region_rows == r]) for r in range(len(ids))],
        torch.from_numpy(sent),
        torch.from_numpy(sent_rows).long(),
        len(ids),
    )
    assert got == ids
    torch.testing.assert_close(from_files, expected, atol=1e-5, rtol=1e-5)
