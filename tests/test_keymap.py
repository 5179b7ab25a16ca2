import pytest
import torch
from monai.networks.nets import ResNet, SwinUNETR

from seg_helpers import resnet_encoder_state, swin_encoder_state
from t3d.config import ModelConfig
from t3d.finetune.networks import build_seg_network, encoder_module
from t3d.models.encoders import RESNET_PRESETS, swap_batch_norms
from t3d.models.keymap import encoder_state, encoder_state_for_resnet, encoder_state_for_swinunetr, load_into
from t3d.pretrained import PretrainedEncoder, monai_target


def pretrain_state(encoder_state_dict):
    """A PretrainModel-like state: encoder keys plus the heads that segmentation must not receive."""
    return {
        **encoder_state_dict,
        "image_head.net.0.weight": torch.zeros(3, 3),
        "decoder.blocks.0.weight": torch.zeros(2),
        "logit_scale.value": torch.tensor(1.0),
    }


def test_swin_mapping_loads_strictly_into_swinunetr_and_copies_values():
    state = pretrain_state(swin_encoder_state(in_channels=2, seed=1))
    mapped = encoder_state_for_swinunetr(state)
    assert mapped and all(k.startswith("swinViT.") for k in mapped)
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=12)
    report = load_into(net, mapped, prefix="swinViT.", strict=True)
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(net.swinViT.state_dict())
    key = "patch_embed.proj.weight"
    assert torch.equal(net.swinViT.state_dict()[key], state[f"encoder.swinViT.{key}"])


def test_mapping_accepts_checkpoints_ddp_prefixes_and_encoder_level_states():
    enc = swin_encoder_state(seed=2)
    reference = encoder_state_for_swinunetr(enc)
    ckpt = {"model": {f"module.{k}": v for k, v in pretrain_state(enc).items()}, "step": 3}
    assert encoder_state_for_swinunetr(ckpt).keys() == reference.keys()
    encoder_level = encoder_state(enc)  # "swinViT.*" keys as in Encoder.state_dict()
    assert all(k.startswith("swinViT.") for k in encoder_level)
    assert encoder_state_for_swinunetr(encoder_level).keys() == reference.keys()


def test_missing_and_unexpected_keys_are_reported_and_strict_load_refuses():
    state = swin_encoder_state(seed=0)
    dropped = "encoder.swinViT.layers1.0.blocks.0.norm1.weight"
    del state[dropped]
    state["encoder.swinViT.bogus.weight"] = torch.zeros(1)
    mapped = encoder_state_for_swinunetr(state)
    net = SwinUNETR(in_channels=2, out_channels=3, feature_size=12)
    with pytest.raises(ValueError, match="1 missing .*layers1.0.blocks.0.norm1.weight.*1 unexpected.*bogus"):
        load_into(net, mapped, prefix="swinViT.", strict=True)
    report = load_into(net, mapped, prefix="swinViT.", strict=False)
    assert report.missing == ["swinViT.layers1.0.blocks.0.norm1.weight"]
    assert report.unexpected == ["swinViT.bogus.weight"]
    assert report.loaded == len(mapped) - 1


def test_shape_mismatch_names_the_channels_problem():
    mapped = encoder_state_for_swinunetr(swin_encoder_state(in_channels=2))
    net = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)  # one HU window instead of two
    with pytest.raises(ValueError, match="input channels"):
        load_into(net, mapped, prefix="swinViT.")


def test_resnet_mapping_loads_into_monai_resnet_and_into_the_seg_network():
    state = pretrain_state(resnet_encoder_state(in_channels=2, seed=3))
    mapped = encoder_state_for_resnet(state)
    assert "conv1.weight" in mapped and not any(k.startswith(("resnet.", "pool_norm")) for k in mapped)
    pre = PretrainedEncoder({}, ModelConfig(encoder="resnet", preset="tiny"), None, ((0, 1), (0, 2)), (64, 64, 64))
    _, kwargs = monai_target(pre)
    resnet = ResNet(**kwargs)
    swap_batch_norms(resnet, kwargs["norm"])  # model.norm=group: MONAI sets the stem's norm, the stages are swapped
    assert load_into(resnet, mapped, strict=True).missing == []
    net = build_seg_network(ModelConfig(encoder="resnet", preset="tiny"), in_channels=2, num_classes=3)
    report = load_into(encoder_module(net), mapped, strict=True)
    assert report.loaded == len(encoder_module(net).state_dict())
    assert torch.equal(encoder_module(net).conv1.weight, state["encoder.resnet.conv1.weight"])
    assert kwargs["block_inplanes"] == RESNET_PRESETS["tiny"][2]


def test_wrong_encoder_family_is_a_clear_error():
    with pytest.raises(ValueError, match="no swinvit weights"):
        encoder_state_for_swinunetr(resnet_encoder_state())
    with pytest.raises(ValueError, match="no resnet weights"):
        encoder_state_for_resnet(swin_encoder_state())
