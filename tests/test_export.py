import json

import pytest
import torch
from monai.networks.nets import ResNet, SwinUNETR
from safetensors import safe_open
from safetensors.torch import load_file

from seg_helpers import CROP, SPACING, write_pretrain_checkpoint
from t3d import __version__
from t3d.checkpoint import load_checkpoint
from t3d.cli import main
from t3d.export import export_encoder
from t3d.models.encoders import swap_batch_norms
from t3d.pretrained import load_pretrained

META_KEYS = {
    "format", "method", "encoder", "preset", "feature_size", "in_channels", "target", "monai_kwargs", "spacing_mm",
    "orientation", "hu_windows", "crop_size", "text_model", "t3d_version", "step", "model_config",
    "preprocess_config",
}  # fmt: skip


def metadata(path):
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


def test_swinvit_export_loads_strictly_into_monai_swinunetr(tmp_path):
    run = write_pretrain_checkpoint(tmp_path / "pre", "swinvit", seed=4)
    out = export_encoder(run, tmp_path / "encoder.safetensors")
    meta = metadata(out)
    assert META_KEYS <= set(meta) and all(isinstance(v, str) for v in meta.values())
    assert (meta["method"], meta["encoder"], meta["preset"], meta["feature_size"]) == ("t3d", "swinvit", "tiny", "12")
    assert meta["in_channels"] == "2" and meta["step"] == "7" and meta["text_model"] == "minilm"
    assert json.loads(meta["spacing_mm"]) == list(SPACING) and json.loads(meta["crop_size"]) == list(CROP)
    assert json.loads(meta["hu_windows"]) == [[-1000.0, 1000.0], [-150.0, 250.0]]
    assert meta["t3d_version"] == __version__
    tensors = load_file(str(out))
    assert not any(k.startswith(("encoder.", "swinViT.")) for k in tensors)
    net = SwinUNETR(out_channels=5, **json.loads(meta["monai_kwargs"]))
    net.swinViT.load_state_dict(tensors, strict=True)  # raises on any missing / unexpected key
    source = load_checkpoint(run)["model"]
    key = "layers2.0.blocks.1.attn.qkv.weight"
    assert torch.equal(net.swinViT.state_dict()[key], source[f"encoder.swinViT.{key}"])


def test_resnet_export_loads_strictly_into_monai_resnet(tmp_path):
    run = write_pretrain_checkpoint(tmp_path / "pre", "resnet", seed=5)
    out = tmp_path / "enc.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    meta = metadata(out)
    # The default model.norm (group) needs MONAI's ResNet plus the swap of its stages' BatchNorm layers.
    assert (
        meta["encoder"] == "resnet"
        and meta["target"] == "monai.networks.nets.ResNet+t3d.models.encoders.swap_batch_norms"
    )
    kwargs = json.loads(meta["monai_kwargs"])
    assert kwargs["feed_forward"] is False  # the pre-trained encoder has no classification fc head
    kwargs["norm"] = tuple(kwargs["norm"])
    resnet = ResNet(**kwargs)
    swap_batch_norms(resnet, kwargs["norm"])
    resnet.load_state_dict(load_file(str(out)), strict=True)
    source = load_checkpoint(run)["model"]
    assert torch.equal(resnet.layer1[0].conv1.weight, source["encoder.resnet.layer1.0.conv1.weight"])
    assert torch.equal(resnet.layer1[0].bn1.weight, source["encoder.resnet.layer1.0.bn1.weight"])


def test_export_round_trips_as_a_finetuning_init(tmp_path):
    run = write_pretrain_checkpoint(tmp_path / "pre", "resnet", seed=6)
    out = export_encoder(run, tmp_path / "enc.safetensors")
    direct, exported = load_pretrained(run), load_pretrained(out)
    assert exported.model == direct.model and exported.preprocess == direct.preprocess
    assert exported.windows == direct.windows and exported.crop_size == direct.crop_size
    resnet_keys = {k for k in direct.state if k.startswith("resnet.")}
    assert set(exported.state) == resnet_keys
    assert all(torch.equal(exported.state[k], direct.state[k]) for k in resnet_keys)


def test_export_errors_are_for_people(tmp_path, capsys):
    run = write_pretrain_checkpoint(tmp_path / "pre", "resnet")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "enc.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e.safetensors")]) == 2
    with pytest.raises(ValueError, match="not a t3d pre-training checkpoint"):
        torch.save({"weights": {}}, tmp_path / "other.pt")
        load_pretrained(tmp_path / "other.pt")
