"""The tiled study path: batch-independent encoders, deterministic tiles, attention pooling, GradCache exactness.

GradCache must give the gradient of the full graph (float64, tiny encoder, rtol 1e-5), in one process and with
two gloo processes whose gathered loss and averaged gradients equal one process on the whole batch.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from t3d import distributed
from t3d.checkpoint import save_checkpoint
from t3d.config import CropConfig, LossConfig, ModelConfig, PretrainConfig, TileConfig, to_dict
from t3d.data.grid import GridCropDataset, body_positions, grid_centres
from t3d.data.tiles import TiledCropDataset
from t3d.evaluate.joint import load_joint
from t3d.losses import MethodSpec, PretrainObjective, method_spec
from t3d.models import TilePooling
from t3d.models.encoders import batch_dependent_norms
from t3d.pretrain.gradcache import check_batch_independent, gradcache_step
from t3d.pretrain.model import PretrainModel
from test_distributed import free_port

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

B, T, ET = 4, 5, 8
MASK = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]  # studies with 5, 3, 2, 4 tiles


def tiled_config(method: str, norm: str = "group") -> PretrainConfig:
    return PretrainConfig(
        method=method,
        crops=CropConfig(size=(32, 32, 32), sites=1, windows=((-1000.0, 1000.0),)),  # one input channel
        model=ModelConfig(encoder="resnet", preset="tiny", embed_dim=16, norm=norm),
        tiles=TileConfig(max_tiles=T, chunk=2, heads=4),
    )


# Without restoration no random masks are drawn, so two ranks see exactly the inputs of one process.
NO_MASKS = MethodSpec("t3d", True, True, "global", False, "none", tiles=True)


def tiled_model(method: str, spec: MethodSpec | None = None) -> tuple[PretrainModel, PretrainObjective]:
    spec = spec or method_spec(method)
    torch.manual_seed(0)
    model = PretrainModel(tiled_config(method), spec, text_dim=ET).double().train()
    objective = PretrainObjective(LossConfig(lambda_align=0.7, tau_text=0.1), spec)
    return model, objective


def tiled_batch(rows=slice(0, B)) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    batch = {
        "views": torch.rand(B, 1, 2, 1, 32, 32, 32, generator=g, dtype=torch.float64),
        "tiles": torch.rand(B, T, 1, 32, 32, 32, generator=g, dtype=torch.float64),
        "tile_pos": torch.rand(B, T, 3, generator=g, dtype=torch.float64) * 2 - 1,
        "tile_mask": torch.tensor(MASK, dtype=torch.bool),
    }
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # sentences per study: 2, 1, 3, 1
    text = {
        "frozen": F.normalize(torch.randn(B, ET, generator=g, dtype=torch.float64), dim=-1),
        "sent": F.normalize(torch.randn(len(owner), ET, generator=g, dtype=torch.float64), dim=-1),
        "sent_owner": owner,
    }
    batch = {k: v[rows] for k, v in batch.items()}
    keep = (owner >= rows.start) & (owner < rows.stop)
    text = {"frozen": text["frozen"][rows], "sent": text["sent"][keep], "sent_owner": owner[keep] - rows.start}
    return batch, text


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def gradcache_grads(method: str, rows=slice(0, B), spec: MethodSpec | None = None) -> tuple[dict, dict]:
    model, objective = tiled_model(method, spec)
    batch, text = tiled_batch(rows)
    generator = torch.Generator().manual_seed(11)
    terms = gradcache_step(model, objective, batch, text, generator, lambda loss: loss.backward(), chunk=2)
    return {k: v.detach() for k, v in terms.items()}, grads(model)


@pytest.mark.parametrize("method", ["t3d", "t3d-sentence"])
def test_gradcache_gradients_equal_the_full_graph(method):
    model, objective = tiled_model(method)
    batch, text = tiled_batch()
    terms = objective(model(batch, text, generator=torch.Generator().manual_seed(11)))  # one graph over all tiles
    terms["loss"].backward()
    want = grads(model)
    got_terms, got = gradcache_grads(method)
    torch.testing.assert_close(got_terms["loss"], terms["loss"].detach(), rtol=1e-10, atol=0)
    assert set(got) == set(want)
    tile_reached = [n for n in want if n.startswith("encoder.") and want[n].abs().sum() > 0]
    assert tile_reached and any(n.startswith("tile_pool.") for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-12, msg=name)


def test_tiled_path_refuses_batch_norm():
    cfg = tiled_config("t3d", norm="batch")
    with pytest.raises(ValueError, match="model.norm=group"):
        PretrainModel(cfg, method_spec("t3d"), text_dim=ET)
    crops_model = PretrainModel(replace(cfg, method="t3d-crops"), method_spec("t3d-crops"), text_dim=ET)
    with pytest.raises(ValueError, match="BatchNorm layers are in training mode"):
        check_batch_independent(crops_model.encoder.train())
    check_batch_independent(crops_model.encoder.eval())  # fixed running statistics do not mix samples


def test_pooling_ignores_padded_tiles_and_uses_positions():
    torch.manual_seed(0)
    pool = TilePooling(32, 8, heads=4, frequencies=3).eval()
    feats, pos = torch.randn(2, 4, 32), torch.rand(2, 4, 3) * 2 - 1
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    u = pool(feats, pos, mask)
    torch.testing.assert_close(u[0], pool(feats[:1, :2], pos[:1, :2])[0], rtol=1e-5, atol=1e-6)
    garbage = feats.clone()
    garbage[0, 2:] = 1e3
    torch.testing.assert_close(pool(garbage, pos, mask), u)
    assert not torch.allclose(pool(feats, -pos, mask), u)  # where a tile is matters
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(2))


# ----------------------------------------------------------------------------------------------- tiles of a study


def test_tiles_are_the_deterministic_body_grid(tiny_cache):
    crops, tiles = CropConfig(size=(32, 32, 32), sites=1), TileConfig(overlap=0.25, max_tiles=6)
    ds = TiledCropDataset(tiny_cache.cache, crops, tiles, seed=0)
    first = ds[3]
    ds.set_epoch(5)
    again = ds[3]
    assert not torch.equal(first["views"], again["views"])  # random crop views change with the epoch ...
    for key in ("tiles", "tile_pos", "tile_mask"):
        assert torch.equal(first[key], again[key]), key  # ... the tiles never do
    key = ds.studies[3][1]["key"]
    volume, fg = ds.cache.image(key), ds.cache.foreground(key)
    n = len(grid_centres(volume.shape, fg, crops.size, tiles.overlap, tiles.max_tiles))
    assert 1 < n <= 6 and int(first["tile_mask"].sum()) == n
    assert first["tiles"].shape == (6, crops.channels, 32, 32, 32) and not first["tiles"][n:].any()
    pos = first["tile_pos"][:n]
    assert pos.min() >= -1 and pos.max() <= 1 and pos.std(dim=0).max() > 0.1
    grid = GridCropDataset(tiny_cache.cache, crops.size, crops.windows, overlap=0.25, max_crops=6)[3]
    torch.testing.assert_close(first["tiles"][:n], grid["crops"])  # the evaluation grid, same tiles
    torch.testing.assert_close(first["tile_pos"][:n], grid["positions"])


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_worker(local, port, folder):
    os.environ.update(RANK=str(local), WORLD_SIZE="2", LOCAL_RANK=str(local))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    distributed.init_distributed(backend="gloo")
    half = B // 2
    model, objective = tiled_model("t3d", NO_MASKS)
    batch, text = tiled_batch(slice(local * half, (local + 1) * half))
    terms = gradcache_step(
        model, objective, batch, text, torch.Generator().manual_seed(11), lambda loss: loss.backward(), chunk=2
    )
    distributed.all_reduce_gradients(model.parameters())
    loss = distributed.all_reduce_mean(terms["loss"].detach())
    torch.save({"loss": loss, "grads": grads(model)}, os.path.join(folder, f"rank{local}.pt"))
    distributed.barrier()
    distributed.cleanup()


def test_two_gloo_processes_give_the_one_process_tiled_loss_and_gradients(tmp_path):
    """Each rank holds half the studies; every term is a mean over equally many local rows against gathered
    columns, so the mean of the ranks' losses is the one-process loss and averaged gradients are its gradients."""
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    terms, want = gradcache_grads("t3d", spec=NO_MASKS)
    torch.testing.assert_close(ranks[0]["loss"], terms["loss"], rtol=1e-10, atol=0)
    for name, grad in want.items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["grads"][name], grad, rtol=1e-5, atol=1e-12, msg=f"{name} rank {r}")


def test_positions_are_normalised_body_coordinates():
    fg = np.array([[10, 20, 5], [30, 60, 5]])
    pos = body_positions(np.array([[10, 20, 5], [20, 40, 5], [40, 0, 5]]), fg, (64, 64, 16))
    np.testing.assert_allclose(pos, [[-1, -1, 0], [0, 0, 0], [1, -1, 0]])


def test_checkpoint_without_model_norm_loads_as_the_batch_norm_it_was_trained_with(tmp_path):
    cfg = replace(tiled_config("t3d", norm="batch"), method="t3d-crops")
    model = PretrainModel(cfg, method_spec("t3d-crops"), text_dim=ET)
    config = to_dict(cfg)
    del config["model"]["norm"]  # written before model.norm existed
    state = {"model": model.state_dict(), "config": config, "method": "t3d-crops", "text_mean": torch.zeros(ET)}
    save_checkpoint(state, tmp_path, "final")
    jm = load_joint(tmp_path, device=torch.device("cpu"))  # strict key matching: running statistics included
    assert jm.cfg.model.norm == "batch" and batch_dependent_norms(jm.model.encoder.train())
