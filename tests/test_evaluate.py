"""Joint-space evaluation: evaluation crop grid, retrieval recall, zero-shot scoring and the `t3d evaluate` CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cls_helpers import synth_dataset, write_checkpoint
from t3d.cli import main
from t3d.data.grid import GridCropDataset, grid_centres
from t3d.evaluate.retrieval import recall_hits, retrieval_metrics
from t3d.evaluate.zeroshot import build_prompts, ensemble, finding_phrase, zeroshot_probabilities
from t3d.metrics import auroc_per_class

# ----------------------------------------------------------------------------------------------- grid


def test_grid_covers_the_body_and_is_deterministic():
    rng = np.random.default_rng(0)
    fg = np.stack([rng.integers(10, 90, 500), rng.integers(20, 60, 500), rng.integers(5, 40, 500)], axis=1)
    shape, size = (100, 80, 50), (32, 32, 32)
    centres = grid_centres(shape, fg, size, overlap=0.25, max_crops=100)
    np.testing.assert_array_equal(centres, grid_centres(shape, fg, size, overlap=0.25, max_crops=100))
    start = centres - 16
    inside = ((fg[:, None] >= start[None]) & (fg[:, None] < start[None] + 32)).all(axis=2)
    assert inside.any(axis=1).all()  # every body voxel is in some crop
    assert (start >= 0).all() and (start + 32 <= np.array(shape)).all()  # crops lie inside the volume


def test_grid_keeps_the_crops_with_most_body_when_capped():
    fg = np.array([[x, 40, 20] for x in range(10, 30)] + [[80, 40, 20]])  # dense on the left, one point on the right
    centres = grid_centres((100, 80, 50), fg, (16, 16, 16), overlap=0.0, max_crops=1)
    assert len(centres) == 1 and centres[0, 0] < 40
    assert len(grid_centres((100, 80, 50), fg, (16, 16, 16), overlap=0.0, max_crops=3)) == 3


def test_grid_of_a_volume_smaller_than_the_crop_is_one_centred_crop():
    assert grid_centres((20, 20, 20), np.empty((0, 3)), (32, 32, 32)).tolist() == [[10, 10, 10]]
    with pytest.raises(ValueError, match="overlap"):
        grid_centres((20, 20, 20), np.empty((0, 3)), (32, 32, 32), overlap=1.0)


# ----------------------------------------------------------------------------------------------- retrieval


def test_recall_of_perfect_matching_is_one_and_of_a_collapsed_model_is_chance():
    emb = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    hits = recall_hits(emb @ emb.T, ks=(1, 5, 10))
    assert hits.mean(axis=0).tolist() == [1.0, 1.0, 1.0]
    flat = recall_hits(torch.ones(30, 30), ks=(1, 5, 10))  # every score tied
    np.testing.assert_allclose(flat.mean(axis=0), [1 / 30, 5 / 30, 10 / 30])


def test_recall_of_random_embeddings_is_near_chance():
    g = torch.Generator().manual_seed(1)
    u, t = (
        F.normalize(torch.randn(400, 16, generator=g), dim=-1),
        F.normalize(torch.randn(400, 16, generator=g), dim=-1),
    )
    result = retrieval_metrics(u, t, n_boot=200, seed=0)
    for direction in ("image_to_report", "report_to_image"):
        r10 = result[direction]["R@10"]
        assert abs(r10["value"] - 10 / 400) < 0.025  # chance 0.025, std ~0.008
        assert r10["low"] <= r10["value"] <= r10["high"]
    assert result["chance"] == {"R@1": 1 / 400, "R@5": 5 / 400, "R@10": 10 / 400}


def test_recall_counts_the_rank_of_the_own_item():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.9, 0.2]])  # ranks of the diagonal: 1, 2, 3
    np.testing.assert_allclose(recall_hits(sim, ks=(1, 2, 3)), [[1, 1, 1], [0, 1, 1], [0, 0, 1]])


# ----------------------------------------------------------------------------------------------- zero-shot


def test_zeroshot_scores_follow_the_prompt_pair():
    e = torch.eye(4)
    pos, neg = e[[0, 2]], e[[1, 3]]  # finding A: axis 0 vs 1, finding B: axis 2 vs 3
    has_a = np.array([1, 1, 0, 0, 1, 0])
    has_b = np.array([0, 1, 1, 0, 0, 1])
    u = F.normalize(
        torch.stack([e[0] if a else e[1] for a in has_a]) + torch.stack([e[2] if b else e[3] for b in has_b]), dim=-1
    )
    probs = zeroshot_probabilities(u, pos, neg, scale=10.0)
    assert probs.shape == (6, 2) and ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(auroc_per_class(np.stack([has_a, has_b], 1), probs), [1.0, 1.0])
    # softmax over the pair = sigmoid of the scaled difference
    expected = torch.sigmoid(10.0 * (u @ pos.T - u @ neg.T)).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)


def test_prompts_from_templates_names_and_explicit_findings():
    spec = {
        "templates": {"positive": ["{} is seen."], "negative": ["No {}."]},
        "names": {"Lung nodule": "a pulmonary nodule"},
        "findings": {"Emphysema": {"positive": ["Emphysematous lungs."], "negative": ["No emphysema."]}},
    }
    prompts = build_prompts(["Lung nodule", "Emphysema", "Pleural_effusion"], spec)
    assert prompts["Lung nodule"] == {
        "positive": ["A pulmonary nodule is seen."],
        "negative": ["No a pulmonary nodule."],
    }
    assert prompts["Emphysema"]["positive"] == ["Emphysematous lungs."]
    assert prompts["Pleural_effusion"]["negative"] == ["No pleural effusion."]
    assert len(build_prompts(["Lung nodule"])["Lung nodule"]["positive"]) == 3  # default ensemble
    assert finding_phrase("CT_finding") == "CT finding"
    with pytest.raises(ValueError, match="unknown key"):
        build_prompts(["a"], {"template": {}})
    with pytest.raises(ValueError, match="contain"):
        build_prompts(["a"], {"templates": {"positive": ["no placeholder"]}})
    assert ensemble(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).norm().item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return {
        "data": synth_dataset(root / "data", num_studies=16),
        "t3d": write_checkpoint(root / "ck_t3d", "t3d"),
        "vssl": write_checkpoint(root / "ck_vssl", "vssl"),
        "root": root,
    }


def test_zeroshot_command(tiny, capsys):
    out = tiny["root"] / "zeroshot"
    data = tiny["data"]
    prompts = tiny["root"] / "prompts.yaml"
    prompts.write_text("templates:\n  positive: ['There is {}.']\n  negative: ['There is no {}.']\n")
    args = ["evaluate", "zeroshot", "--checkpoint", str(tiny["t3d"]), "--data", str(data / "findings.csv")]
    args += ["--out", str(out), "--n-boot", "30", "--workers", "0", "--max-crops", "2", "--prompts", str(prompts)]
    assert main(args + ["--splits", str(data / "splits.json"), "--split", "finetune"]) == 0
    assert "macro AUROC" in capsys.readouterr().out
    for name in ("metrics.json", "report.md", "roc.png", "scores.csv", "prompts.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    finetune_ids = json.loads((data / "splits.json").read_text())["finetune"]
    assert metrics["test"]["n_studies"] == len(finetune_ids) and metrics["method"] == "t3d"
    assert set(metrics["test"]["per_class"]) == set(metrics["classes"])
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["id"] for r in rows) == sorted(finetune_ids)
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p:")] for r in rows])
    assert ((probs >= 0) & (probs <= 1)).all()
    macro = metrics["test"]["macro"]["auroc"]
    assert macro["value"] is None or 0 <= macro["value"] <= 1
    assert json.loads((out / "prompts.json").read_text())["Liver lesion"]["positive"] == ["There is liver lesion."]


def test_text_side_is_centred_with_the_checkpoint_mean(tiny):
    from t3d.evaluate.joint import load_joint, text_embeddings
    from t3d.text import load_text_features

    jm = load_joint(tiny["t3d"], device=torch.device("cpu"))
    texts = ["There is a lung nodule.", "There is no lung nodule."]
    got = text_embeddings(jm, texts, tiny["root"] / "text_cache")
    pooled = load_text_features(texts, jm.cfg.text, tiny["root"] / "text_cache").pooled
    with torch.no_grad():
        expected = jm.model.text_head(F.normalize(pooled - jm.text_mean, dim=-1))
    torch.testing.assert_close(got, expected)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_retrieval_command(tiny, capsys):
    out = tiny["root"] / "retrieval"
    data = tiny["data"]
    args = ["evaluate", "retrieval", "--checkpoint", str(tiny["t3d"]), "--manifest", str(data / "reports.jsonl")]
    args += ["--splits", str(data / "splits.json"), "--split", "test", "--out", str(out), "--n-boot", "30"]
    assert main(args + ["--workers", "0", "--max-crops", "2"]) == 0
    printed = capsys.readouterr().out
    assert "chance" in printed and "image to report" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    n = len(json.loads((data / "splits.json").read_text())["test"])
    assert metrics["n_studies"] == n
    assert metrics["chance"]["R@1"] == pytest.approx(1 / n)
    for direction in ("image_to_report", "report_to_image"):
        assert set(metrics[direction]) == {"R@1", "R@5", "R@10"}
        assert all(0 <= v["value"] <= 1 for v in metrics[direction].values())
        assert metrics[direction]["R@10"]["value"] == 1.0  # 10 >= N held-out studies: every item is in the top 10
    assert "chance (k / N)" in (out / "report.md").read_text()


def test_checkpoint_without_text_head_is_a_clear_error(tiny, capsys):
    args = ["evaluate", "zeroshot", "--checkpoint", str(tiny["vssl"]), "--data", str(tiny["data"] / "findings.csv")]
    assert main(args + ["--out", str(tiny["root"] / "zs_vssl"), "--workers", "0"]) == 2
    assert "no joint image-text space" in capsys.readouterr().err


def test_grid_dataset_reads_windowed_crops_of_the_cache(tiny):
    from cls_helpers import tiny_pretrain_config
    from t3d.data.labels import prepare_label_cache, read_labels

    cache = tiny["root"] / "grid_cache"
    prepare_label_cache(read_labels(tiny["data"] / "findings.csv"), cache, tiny_pretrain_config().preprocess)
    ds = GridCropDataset(cache, (32, 32, 32), ((-1000.0, 1000.0), (-150.0, 250.0)), max_crops=4)
    item = ds[0]
    assert item["crops"].shape[1:] == (2, 32, 32, 32) and 1 <= item["crops"].shape[0] <= 4
    assert 0.0 <= float(item["crops"].min()) and float(item["crops"].max()) <= 1.0
    torch.testing.assert_close(item["crops"], ds[0]["crops"])


# ----------------------------------------------------------------------------------------------- align: sentence


def test_sentence_scores_average_each_sentences_best_region():
    from t3d.evaluate.joint import sentence_scores

    e = torch.eye(3)
    regions = [e[[0, 1]], e[[2]]]  # study 0: regions along x and y; study 1: one region along z
    sent = torch.stack([e[0], e[2], e[1]])  # report 0: "x" and "z"; report 1: "y"
    scores = sentence_scores(regions, sent, torch.tensor([0, 0, 1]), n_texts=2)  # (studies, reports)
    torch.testing.assert_close(scores, torch.tensor([[0.5, 1.0], [0.5, 0.0]]))  # padding never wins the max


def test_a_sentence_checkpoint_is_evaluated_by_its_sentences_best_tiles(tiny, capsys):
    from t3d.evaluate.joint import load_joint, region_embeddings, sentence_embeddings, study_dataset
    from t3d.evaluate.retrieval import retrieval_from_scores
    from t3d.evaluate.studies import report_texts

    data, ck = tiny["data"], write_checkpoint(tiny["root"] / "ck_sentence", "t3d-sentence")
    out = tiny["root"] / "retrieval_sentence"
    args = ["evaluate", "retrieval", "--checkpoint", str(ck), "--manifest", str(data / "reports.jsonl")]
    assert main(args + ["--out", str(out), "--n-boot", "30", "--workers", "0"]) == 0  # all 16 studies
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scores"] == "sentence" and metrics["method"] == "t3d-sentence"

    jm = load_joint(ck, device=torch.device("cpu"))
    ids, texts = report_texts(out / "cache", jm.cfg.text.sections, None)
    regions, got = region_embeddings(jm, study_dataset(jm.cfg, jm.spec, out / "cache", ids))
    sent, owner = sentence_embeddings(jm, texts, out / "cache" / "text")
    assert got == ids and owner.tolist() == sorted(owner.tolist()) and len(set(owner.tolist())) == len(texts)
    expected = torch.tensor(
        [[float(np.mean([(r @ s).max() for s in sent[owner == j]])) for j in range(len(texts))] for r in regions]
    )
    recomputed = retrieval_from_scores(expected, n_boot=30)
    assert len(ids) == 16 and metrics["n_studies"] == 16
    for direction in ("image_to_report", "report_to_image"):
        for k in ("R@1", "R@5"):
            assert metrics[direction][k]["value"] == pytest.approx(recomputed[direction][k]["value"]), (direction, k)

    zs = tiny["root"] / "zeroshot_sentence"
    args = ["evaluate", "zeroshot", "--checkpoint", str(ck), "--data", str(data / "findings.csv"), "--out", str(zs)]
    assert main(args + ["--n-boot", "30", "--workers", "0", "--splits", str(data / "splits.json")]) == 0
    assert json.loads((zs / "metrics.json").read_text())["scores"] == "sentence"
    capsys.readouterr()
