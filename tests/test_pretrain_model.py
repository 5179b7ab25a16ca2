"""``PretrainModel``: the study embedding (its own head over pooled crop features, the same function in training and
evaluation) and batch statistics kept apart for clean and masked crops (BatchNorm, SyncBatchNorm under DDP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cls_helpers import tiny_pretrain_config
from t3d import distributed as dist
from t3d.evaluate.joint import JointModel, image_embeddings
from t3d.losses import PretrainObjective, method_spec
from t3d.pretrain.model import PretrainModel

TEXT_DIM = 8

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def model_and_batch(method="t3d-crops", b=3, k=2, seed=0, norm=None):
    """A tiny model and batch; ``norm`` sets ``model.norm`` of the ResNet (None: the config default, group)."""
    cfg = tiny_pretrain_config(method)
    cfg.crops.sites = k
    if norm is not None:
        cfg.model.norm = norm
    torch.manual_seed(seed)
    model = PretrainModel(cfg, method_spec(method), text_dim=TEXT_DIM)
    g = torch.Generator().manual_seed(seed + 1)
    views = torch.rand(b, k, 2, cfg.crops.channels, *cfg.crops.size, generator=g)
    text = {"frozen": F.normalize(torch.randn(b, TEXT_DIM, generator=g), dim=-1)}
    return model, {"views": views}, text


def test_training_and_evaluation_compute_the_same_study_embedding():
    model, batch, text = model_and_batch()
    model.eval()  # no batch statistics in eval mode: the function of one study does not depend on the batch
    with torch.no_grad():
        u_train = model(batch, text, generator=torch.Generator().manual_seed(0))["study_emb"]
    # Evaluation sees each study's clean crops (view 0 of every site: the crops the training forward pools).
    studies = [{"crops": batch["views"][i, :, 0], "id": f"s{i}"} for i in range(len(batch["views"]))]
    jm = JointModel("mem", model.cfg, model.spec, model, torch.zeros(TEXT_DIM), "", 0, torch.device("cpu"))
    u_eval, ids = image_embeddings(jm, studies, crop_batch=1)
    assert ids == ["s0", "s1", "s2"]
    torch.testing.assert_close(u_eval, u_train, rtol=1e-5, atol=1e-6)


def test_study_embedding_has_its_own_head_over_pooled_features():
    model, batch, text = model_and_batch()
    out = model(batch, text, generator=torch.Generator().manual_seed(0))
    mean_of_view_head = F.normalize(out["crop_emb"][:, :, 0].mean(dim=1), dim=-1)
    assert not torch.allclose(out["study_emb"], mean_of_view_head, atol=1e-3)
    # L_align trains the study head and the encoder, not the view head (whose job is telling crops apart).
    cfg = model.cfg.loss
    cfg.lambda_align, cfg.lambda_tir = 1.0, 0.0
    terms = PretrainObjective(cfg, model.spec)(out)
    terms["align"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.align_head.parameters())
    assert all(p.grad is None for p in model.image_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_clip_uses_the_study_head_on_the_whole_volume():
    cfg = tiny_pretrain_config("clip")
    model = PretrainModel(cfg, method_spec("clip"), text_dim=TEXT_DIM).eval()
    assert model.image_head is None  # no crop-level term: every parameter gets a gradient (DDP)
    volume = torch.rand(2, cfg.crops.channels, *cfg.clip.grid)
    with torch.no_grad():
        u = model({"volume": volume}, {"frozen": F.normalize(torch.randn(2, TEXT_DIM), dim=-1)})["study_emb"]
        expected = model.align_head(model.encoder.pool(model.encoder.forward_features(volume))[:, None])
    torch.testing.assert_close(u, expected)


def test_clean_crops_do_not_share_batch_statistics_with_masked_crops():
    """Train-mode BatchNorm (the ResNet encoder): what is hidden in the masked views must not move the embeddings of
    the clean views, so L_view's clean side and the study embedding depend only on clean crops."""
    model, batch, text = model_and_batch(norm="batch")
    model.train()
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.encoder.modules())
    other = {"views": batch["views"].clone()}
    other["views"][:, :, 1] = torch.rand_like(other["views"][:, :, 1]) * 3.0  # different masked views
    with torch.no_grad():
        a = model(batch, text, generator=torch.Generator().manual_seed(0))
        b = model(other, text, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["crop_emb"][:, :, 0], b["crop_emb"][:, :, 0])
    torch.testing.assert_close(a["study_emb"], b["study_emb"])
    assert not torch.allclose(a["crop_emb"][:, :, 1], b["crop_emb"][:, :, 1])


def test_sync_batch_norm_under_ddp_on_accelerators(monkeypatch):
    model, _, _ = model_and_batch(norm="batch")
    assert dist.sync_batch_norm(model, torch.device("cpu")) is model  # one process: unchanged
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    assert dist.sync_batch_norm(model, torch.device("cpu")) is model  # gloo on CPU: SyncBatchNorm cannot run
    synced = dist.sync_batch_norm(model, torch.device("cuda", 0))  # conversion itself needs no GPU
    kinds = {type(m) for m in synced.modules()}
    assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm3d not in kinds
