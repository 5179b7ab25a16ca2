"""Encoders, heads and the restoration decoder: tiny presets, 32^3 crops, N=2, CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet, SwinUNETR

from t3d.config import ENCODER_PRESETS, ConfigError, ModelConfig
from t3d.losses.objective import mean_pairwise_cosine
from t3d.models import PRESETS, LogitScale, ProjectionHead, RestorationDecoder, build_encoder
from t3d.models.encoders import (
    HAS_EINOPS,
    RESNET_NORMS,
    RESNET_PRESETS,
    SWIN_PRESETS,
    batch_dependent_norms,
    swap_batch_norms,
)

SIZE = (32, 32, 32)
needs_einops = pytest.mark.skipif(not HAS_EINOPS, reason="MONAI's SwinTransformer needs einops (pip install einops)")
ENCODERS = [pytest.param("swinvit", marks=needs_einops), "resnet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def smooth_volume(n: int, low: float, high: float, seed: int, size=SIZE) -> torch.Tensor:
    """(n, 1, D, H, W) smooth random intensities in [low, high] (a stand-in for windowed CT crops)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, 4, generator=g)
    return low + (high - low) * F.interpolate(coarse, size=size, mode="trilinear", align_corners=False)


def tiny(encoder: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder(ModelConfig(encoder=encoder, preset="tiny", **kw), in_channels=1, img_size=SIZE)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("encoder", ENCODERS)
def test_features_match_declared_channels_and_strides(encoder):
    enc = tiny(encoder)
    x = smooth_volume(2, 0.0, 1.0, seed=1)
    feats, pooled = enc(x)
    assert len(feats) == len(enc.feature_channels) == len(enc.feature_strides) == 6
    assert feats[0] is x  # the input is the stride-1 skip
    for f, c, s in zip(feats, enc.feature_channels, enc.feature_strides):
        assert tuple(f.shape) == (2, c, *(n // s for n in SIZE))
    assert tuple(pooled.shape) == (2, enc.embed_channels) and enc.embed_channels == enc.feature_channels[-1]
    assert torch.isfinite(pooled).all()


def test_presets_agree_with_config_and_have_sane_sizes(capsys):
    assert {k: tuple(v) for k, v in PRESETS.items()} == ENCODER_PRESETS
    counts = {}
    for encoder, presets in PRESETS.items():
        for preset in presets:
            if encoder == "swinvit" and not HAS_EINOPS:
                continue
            cfg = ModelConfig(encoder=encoder, preset=preset)
            counts[f"{encoder}/{preset}"] = n_params(build_encoder(cfg, 1, SIZE))
    print({k: f"{v / 1e6:.2f}M" for k, v in counts.items()})
    ranges = {
        "swinvit/tiny": (0.4e6, 1.0e6),  # feature size 12
        "swinvit/small": (1.5e6, 3.0e6),
        "swinvit/base": (6e6, 10e6),  # feature size 48: SwinUNETR-base's swinViT
        "resnet/tiny": (0.5e6, 1.5e6),
        "resnet/10": (10e6, 20e6),
        "resnet/18": (25e6, 40e6),
        "resnet/50": (40e6, 55e6),
    }
    for name, count in counts.items():
        low, high = ranges[name]
        assert low < count < high, f"{name}: {count} parameters"


def test_crop_size_and_preset_errors_are_for_people():
    with pytest.raises(ValueError, match=r"crops\.size=\(40, 32, 96\).*multiple of 32.*crops\.size=\[32, 32, 96\]"):
        build_encoder(ModelConfig(encoder="resnet"), 1, (40, 32, 96))
    enc = tiny("resnet")
    with pytest.raises(ValueError, match=r"crops\.size"):
        enc.forward_features(torch.zeros(1, 1, 32, 32, 40))
    with pytest.raises(ValueError, match=r"expects \(N, 1, D, H, W\)"):
        enc.forward_features(torch.zeros(1, 2, 32, 32, 32))
    with pytest.raises(ConfigError, match="model.preset.*'base'"):
        ModelConfig(encoder="resnet", preset="base")
    with pytest.raises(ValueError, match="in_channels"):
        build_encoder(ModelConfig(encoder="resnet"), 0, SIZE)


@needs_einops
@pytest.mark.parametrize("use_v2", [False, True])
def test_swinvit_weights_load_into_swinunetr_strictly(use_v2):
    enc = tiny("swinvit", swin_v2=use_v2).eval()
    state = {k[len("swinViT.") :]: v for k, v in enc.state_dict().items() if k.startswith("swinViT.")}
    seg = SwinUNETR(in_channels=1, out_channels=3, feature_size=SWIN_PRESETS["tiny"], use_v2=use_v2).eval()
    seg.swinViT.load_state_dict(state, strict=True)
    x = smooth_volume(1, 0.0, 1.0, seed=2)
    with torch.no_grad():
        ours = enc.forward_features(x)[1:]
        theirs = seg.swinViT(x, seg.normalize)  # what SwinUNETR.forward feeds its decoder
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet_weights_load_into_monai_resnet_strictly(norm):
    enc = tiny("resnet", norm=norm).eval()
    block, layers, widths = RESNET_PRESETS["tiny"]
    net = ResNet(
        block, layers, widths, n_input_channels=1, conv1_t_stride=2, shortcut_type="B",
        feed_forward=False, bias_downsample=False, norm=RESNET_NORMS[norm],
    ).eval()  # fmt: skip
    if norm != "batch":
        swap_batch_norms(net, RESNET_NORMS[norm])
    net.load_state_dict(enc.resnet.state_dict(), strict=True)
    assert enc.resnet_config == {"block": block, "layers": layers, "block_inplanes": widths}
    x = smooth_volume(2, 0.0, 1.0, seed=3)
    with torch.no_grad():
        deepest = enc.forward_features(x)[-1]
        # MONAI's own forward ends in global average pooling of layer4: must equal our deepest map's mean.
        torch.testing.assert_close(net(x), deepest.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("norm", ["group"])
def test_batch_independent_resnet_has_no_batch_norm_and_embeds_each_sample_alone(norm):
    enc = tiny("resnet", norm=norm).train()
    assert batch_dependent_norms(enc) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    x = smooth_volume(3, 0.0, 1.0, seed=4)
    with torch.no_grad():
        together = enc.pool(enc.forward_features(x))
        alone = torch.cat([enc.pool(enc.forward_features(x[i : i + 1])) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)  # training mode, yet batch-independent
    assert batch_dependent_norms(tiny("resnet", norm="batch").train())  # BatchNorm in training mode is listed


# ----------------------------------------------------------------------------------------------- pooling rule


@pytest.mark.parametrize("encoder", ENCODERS)
def test_pooled_embedding_carries_the_sample(encoder):
    enc = tiny(encoder).eval()
    # A dark, lung-like crop and a bright, soft-tissue-like crop.
    x = torch.cat([smooth_volume(1, 0.0, 0.3, seed=4), smooth_volume(1, 0.5, 1.0, seed=5)])
    with torch.no_grad():
        pooled = enc(x)[1]
    cos = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    assert cos < 0.99, f"{encoder}: pooled embeddings of different crops nearly identical (cos {cos:.4f})"
    spread = (pooled - pooled.mean(0)).norm(dim=1) / pooled.norm(dim=1)
    assert (spread > 1e-2).all(), f"{encoder}: pooled vector (almost) constant across the batch: {spread}"


def info_nce(z0: torch.Tensor, z1: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    return F.cross_entropy(z0 @ z1.T / tau, torch.arange(len(z0)))


def test_gap_of_instance_normalised_maps_is_what_we_avoid():
    """Average-pooling an instance-normalised map gives every sample the same vector: InfoNCE sits at log B.
    Our pooling of the same encoder's deepest map lets the same loss fall within a few steps."""
    enc = tiny("resnet")
    head = ProjectionHead(enc.embed_channels, 32)
    size = (64, 64, 64)  # deepest map 2^3: instance norm needs more than one voxel
    x = torch.cat([smooth_volume(2, 0.0, 0.5, seed=7, size=size), smooth_volume(2, 0.4, 1.0, seed=8, size=size)])
    g = torch.Generator().manual_seed(9)
    views = [x + 0.02 * torch.randn(x.shape, generator=g) for _ in range(2)]

    def forbidden(v):
        return F.instance_norm(enc.forward_features(v)[-1]).mean(dim=(2, 3, 4))  # (N, C) of (near) zeros

    bad = [forbidden(v) for v in views]
    # one (zero) vector for every sample: whatever a head does with it, every sample gets the same embedding
    assert torch.allclose(bad[0], torch.zeros_like(bad[0]), atol=1e-5)
    same = head(bad[0][:1]).expand(4, -1)
    assert info_nce(same, same).item() == pytest.approx(math.log(4), abs=1e-5)

    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = info_nce(head(enc(views[0])[1]), head(enc(views[1])[1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < math.log(4) - 0.5, losses


# ----------------------------------------------------------------------------------------------- checkpointing


def _checkpointed_leaf(enc) -> torch.nn.Module:
    # A leaf early in a checkpointed segment: recomputation stops once the saved tensors are rebuilt, so hooks
    # of the segment's outer module do not fire a second time.
    return enc.swinViT.layers1[0].blocks[0].attn.qkv if enc.name == "swinvit" else enc.resnet.layer1[0].conv1


@pytest.mark.parametrize("encoder", ENCODERS)
def test_grad_checkpointing_recomputes_but_changes_nothing(encoder):
    enc = tiny(encoder)
    x = smooth_volume(1 if encoder == "swinvit" else 2, 0.0, 1.0, seed=10)  # BatchNorm needs N > 1; Swin is slow
    calls = []
    _checkpointed_leaf(enc).register_forward_hook(lambda *_: calls.append(1))
    results = []
    for enable in (False, True):
        enc.set_grad_checkpointing(enable)
        enc.zero_grad()
        calls.clear()
        feats, pooled = enc(x)
        (pooled.square().sum() + sum(f.mean() for f in feats[1:])).backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        results.append((pooled.detach(), grads, len(calls)))
    (out0, grads0, calls0), (out1, grads1, calls1) = results
    assert (calls0, calls1) == (1, 2)  # checkpointing really recomputes the module in backward
    torch.testing.assert_close(out0, out1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads0[name], grads1[name], msg=name)
    assert tiny(encoder, grad_checkpointing=True).grad_checkpointing


# ----------------------------------------------------------------------------------------------- heads


def test_projection_head_is_unit_norm_and_checks_width():
    head = ProjectionHead(48, 16)
    z = head(torch.randn(5, 48))
    assert z.shape == (5, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 48\)"):
        head(torch.randn(5, 40))


def test_projection_head_keeps_the_spread_of_centred_inputs_at_init():
    """Spread-out unit inputs (centred report features, cosine ~0) must not start in one cone after the head: a
    shared offset (bias) would make every image-report logit alike and L_align blind to which report is which."""
    torch.manual_seed(0)
    x = F.normalize(torch.randn(64, 384), dim=1)  # pairwise cosine ~0, like centred reports
    assert abs(float(mean_pairwise_cosine(x))) < 0.05
    for seed in range(3):
        torch.manual_seed(seed)
        head = ProjectionHead(384, 64)
        assert all(not hasattr(m, "bias") or m.bias is None for m in head.modules())
        with torch.no_grad():
            assert abs(float(mean_pairwise_cosine(head(x)))) < 0.1
    # what the check guards against: the same MLP with PyTorch's default biases starts in a narrow cone
    biased = torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.GELU(), torch.nn.Linear(384, 64))
    with torch.no_grad():
        assert float(mean_pairwise_cosine(F.normalize(biased(x), dim=1))) > 0.5


def test_logit_scale_starts_at_one_over_tau_and_stays_in_range():
    scale = LogitScale(tau=0.07)
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-5) and scale.tau == pytest.approx(0.07, rel=1e-5)
    scale().backward()
    assert scale.log_scale.grad.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(100.0, rel=1e-5)
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0))
    frozen = LogitScale(tau=0.1, learnable=False)
    assert n_params(frozen) == 0 and frozen().item() == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(ValueError, match="tau"):
        LogitScale(tau=0.001)


# ----------------------------------------------------------------------------------------------- restoration

SWIN_TINY_CHANNELS = [1, 12, 24, 48, 96, 192]
ET = 24  # report embedding width in these tests


def fake_features(channels=SWIN_TINY_CHANNELS, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, *(s // 2**i for s in SIZE), generator=g) for i, c in enumerate(channels)]


def decoder(conditioning: str, channels=SWIN_TINY_CHANNELS) -> RestorationDecoder:
    torch.manual_seed(0)
    return RestorationDecoder(channels, out_channels=1, cond_dim=ET, conditioning=conditioning).eval()


@pytest.mark.parametrize("conditioning", ["film", "cross_attention", "none"])
def test_decoder_restores_at_input_resolution(conditioning):
    feats = fake_features()
    g = torch.Generator().manual_seed(1)
    cond, tokens = torch.randn(2, ET, generator=g), torch.randn(2, 5, ET, generator=g)
    out = decoder(conditioning)(feats, cond=cond, tokens=tokens, token_mask=torch.ones(2, 5, dtype=torch.bool))
    assert tuple(out.shape) == (2, 1, *SIZE) and torch.isfinite(out).all()


def test_decoder_end_to_end_on_resnet_features_trains_the_encoder():
    enc = tiny("resnet")
    dec = RestorationDecoder(enc.feature_channels, 1, cond_dim=ET, conditioning="film")
    x = smooth_volume(2, 0.0, 1.0, seed=11)
    out = dec(enc.forward_features(x), cond=torch.randn(2, ET))
    F.l1_loss(out, x).backward()
    assert out.shape == x.shape
    assert enc.resnet.layer4[0].conv1.weight.grad.abs().sum() > 0
    assert dec.films[0].linear.weight.grad.abs().sum() > 0  # zero-initialised FiLM still learns


def test_film_is_identity_at_init_and_then_uses_the_report():
    dec = decoder("film")
    feats = fake_features()
    a, b = torch.randn(2, ET), torch.randn(2, ET)
    with torch.no_grad():
        torch.testing.assert_close(dec(feats, cond=a), dec(feats, cond=b))
        unconditioned = decoder("none")
        unconditioned.load_state_dict(dec.state_dict(), strict=False)  # same conv weights, no FiLM
        torch.testing.assert_close(dec(feats, cond=a), unconditioned(feats))
        for film in dec.films:
            film.linear.weight.normal_(0, 0.1)
        assert (dec(feats, cond=a) - dec(feats, cond=b)).abs().max() > 1e-3


def test_cross_attention_ignores_padded_tokens():
    dec = decoder("cross_attention")
    feats = fake_features()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 6, ET, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    other_padding = tokens.clone()
    other_padding[~mask] = torch.randn(int((~mask).sum()), ET, generator=g) * 10
    other_valid = tokens.clone()
    other_valid[mask] = torch.randn(int(mask.sum()), ET, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(dec(feats, tokens=tokens, token_mask=mask), dec(feats, tokens=other_valid))
        assert sorted(dec.attns) == ["4", "5"]  # the two coarsest levels (stride 16 and 32)
        for attn in dec.attns.values():
            attn.attn.out_proj.weight.normal_(0, 0.2)
        out = dec(feats, tokens=tokens, token_mask=mask)
        torch.testing.assert_close(out, dec(feats, tokens=other_padding, token_mask=mask))
        assert (out - dec(feats, tokens=other_valid, token_mask=mask)).abs().max() > 1e-3
        empty = torch.zeros_like(mask)
        empty[1] = True
        out_empty = dec(feats, tokens=tokens, token_mask=empty)  # sample 0 has no valid token at all
        assert torch.isfinite(out_empty).all()
        assert not torch.allclose(out_empty[0], out[0])


def test_decoder_errors_name_the_fix():
    feats = fake_features()
    with pytest.raises(ValueError, match="needs cond"):
        decoder("film")(feats)
    with pytest.raises(ValueError, match=r"needs tokens.*tokens=True"):
        decoder("cross_attention")(feats, cond=torch.randn(2, ET))
    with pytest.raises(ValueError, match=r"cond must be \(2, 24\)"):
        decoder("film")(feats, cond=torch.randn(2, 7))
    with pytest.raises(ValueError, match="not one of"):
        RestorationDecoder(SWIN_TINY_CHANNELS, 1, ET, conditioning="concat")
    with pytest.raises(ValueError, match=r"feature map 2: expected \(N, 24"):
        decoder("none")([feats[0], feats[1], feats[1], *feats[3:]])
    with pytest.raises(ValueError, match="must be twice"):
        decoder("none")([feats[0][..., :16], *feats[1:]])


def test_decoder_grad_checkpointing_changes_nothing():
    dec = decoder("film").train()
    feats = [f.requires_grad_() for f in fake_features()]
    cond = torch.randn(2, ET)
    calls = []
    first_conv = next(m for m in dec.ups[0].modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for enable in (False, True):
        dec.set_grad_checkpointing(enable)
        dec.zero_grad()
        calls.clear()
        for f in feats:
            f.grad = None
        out = dec(feats, cond=cond)
        out.square().mean().backward()
        # Levels finer than the decoder's finest skip are not read (no gradient), the others are.
        assert [f.grad is not None for f in feats] == [i >= dec.finest_skip for i in range(len(feats))]
        grads = [f.grad.clone() for f in feats if f.grad is not None]
        grads += [p.grad.clone() for p in dec.parameters() if p.grad is not None]
        results.append((out.detach(), grads, len(calls)))
    (out0, grads0, calls0), (out1, grads1, calls1) = results
    assert (calls0, calls1) == (1, 2)
    torch.testing.assert_close(out0, out1)
    assert len(grads0) == len(grads1) > len(feats)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b)
