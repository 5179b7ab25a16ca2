"""Losses against naive Python-loop references (float64), limits (τ → 0 gives InfoNCE / CLIP), masking, objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from t3d.config import METHODS, ConfigError, LossConfig, PretrainConfig, from_dict
from t3d.losses import (
    PretrainObjective,
    align_loss,
    corrupt,
    hard_targets,
    method_spec,
    near_duplicate_share,
    random_cube_mask,
    restoration_loss,
    sentence_align_loss,
    soft_cross_entropy,
    target_entropy,
    target_self_prob,
    text_affinity_targets,
    view_loss,
)

DT = torch.float64


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)


def soft_rows(seed=0, b=5):
    """A row-stochastic, non-symmetric target matrix."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, b, generator=g, dtype=DT) * 2, dim=1)


# ----------------------------------------------------------------------------------------------- naive references


def dot(a, b):
    return sum(float(a[k]) * float(b[k]) for k in range(len(a)))


def naive_soft_ce(logits, targets):
    rows = []
    for i in range(len(logits)):
        lse = math.log(sum(math.exp(float(v)) for v in logits[i]))
        rows.append(-sum(float(targets[i][j]) * (float(logits[i][j]) - lse) for j in range(len(logits[i]))))
    return sum(rows) / len(rows)


def naive_logits(a, b, scale):
    return [[scale * dot(a[i], b[j]) for j in range(len(b))] for i in range(len(a))]


def naive_symmetric(a, b, y, scale):
    return 0.5 * (naive_soft_ce(naive_logits(a, b, scale), y) + naive_soft_ce(naive_logits(b, a, scale), y))


def naive_affinity(s, threshold, alpha, tau):
    y = []
    for i in range(len(s)):
        w = [
            math.exp((dot(s[i], s[j]) - 1.0) / tau) if dot(s[i], s[j]) >= threshold or i == j else 0.0
            for j in range(len(s))
        ]
        y.append([(1 - alpha) * (i == j) + alpha * v / sum(w) for j, v in enumerate(w)])
    return torch.tensor(y, dtype=DT)


def naive_sentence_scores(crops, sent, owner, b):
    """scores[i][j]: study i (crops) vs report j = mean over j's sentences of max over i's crops."""
    scores = [[0.0] * b for _ in range(b)]
    for i in range(b):
        for j in range(b):
            own = [s for s, o in zip(sent, owner) if int(o) == j]
            scores[i][j] = sum(max(dot(c, s) for c in crops[i]) for s in own) / len(own)
    return scores


# ----------------------------------------------------------------------------------------------- affinity


def test_soft_cross_entropy_matches_loop_and_hard_targets_give_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, generator=g, dtype=DT) * 3
    targets = torch.softmax(torch.randn(4, 6, generator=g, dtype=DT), dim=1)
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(naive_soft_ce(logits, targets), rel=1e-10)
    labels = torch.tensor([0, 5, 2, 2])
    onehot = F.one_hot(labels, 6).to(DT)
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="differ"):
        soft_cross_entropy(logits, targets[:3])


def near_copy(v, cos, seed):
    """A unit vector at cosine ``cos`` from the unit vector ``v``."""
    w = unit(len(v), seed=seed)
    w = F.normalize(w - (w @ v) * v, dim=0)
    return cos * v + math.sqrt(1 - cos**2) * w


def test_text_affinity_targets_match_loop_and_carry_no_gradient():
    s = unit(6, 7, seed=2)
    s[3] = near_copy(s[0], 0.95, seed=40)
    s[5] = near_copy(s[0], 0.93, seed=41)
    s.requires_grad_()
    y = text_affinity_targets(s, 0.9, 0.3, 0.05)
    torch.testing.assert_close(y, naive_affinity(s.detach(), 0.9, 0.3, 0.05))
    assert not y.requires_grad
    torch.testing.assert_close(y.sum(dim=1), torch.ones(6, dtype=DT))
    assert y[0, 3] > 0 and y[0, 5] > 0 and y[0, 1] == 0
    assert target_self_prob(y).item() == pytest.approx(float(y.diagonal().mean()))
    assert target_self_prob(hard_targets(4)).item() == 1.0
    with pytest.raises(ValueError, match="tau_text must be > 0"):
        text_affinity_targets(s, 0.9, 0.3, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        text_affinity_targets(s, 0.9, 1.0, 0.05)


@pytest.mark.parametrize("batch", [4, 64])
def test_distinct_reports_give_identity_targets_at_any_batch_size(batch):
    """Reports that say different things share no mass, however small or large the batch (no per-batch scale)."""
    raw = F.normalize(3.0 + torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch), dtype=DT), dim=1)
    s = F.normalize(raw - raw.mean(0), dim=1)  # centred like the frozen report features
    cfg = LossConfig()
    assert (s @ s.T - 2 * torch.eye(batch, dtype=DT)).max() < cfg.affinity_threshold
    y = text_affinity_targets(s, cfg.affinity_threshold, cfg.affinity_alpha, cfg.tau_text)
    torch.testing.assert_close(y, torch.eye(batch, dtype=DT))
    assert target_entropy(y).item() == pytest.approx(0.0, abs=1e-12)


def test_identical_reports_share_mass_and_entropy_is_the_floor():
    s = unit(6, 8, seed=3)
    s[4] = s[1]  # two studies with the same report ("no acute findings")
    y = text_affinity_targets(s, 0.9, 0.2, 0.05)
    for row, other in ((1, 4), (4, 1)):
        assert y[row, row].item() == pytest.approx(0.9) and y[row, other].item() == pytest.approx(0.1)
    torch.testing.assert_close(y[0], torch.eye(6, dtype=DT)[0])
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) * 2 / 6
    assert target_entropy(y).item() == pytest.approx(entropy)
    # soft CE against Y is never below H(Y), and reaches it where the predicted rows equal Y
    assert soft_cross_entropy(torch.log(y + 1e-12), y).item() == pytest.approx(entropy, abs=1e-9)
    assert soft_cross_entropy(torch.randn(6, 6, dtype=DT), y).item() > entropy
    assert near_duplicate_share(s, 0.9) == pytest.approx(2 / 30)


def test_retired_target_self_prob_is_a_config_error_naming_the_new_keys():
    with pytest.raises(ConfigError, match="affinity_threshold.*affinity_alpha"):
        from_dict(PretrainConfig, {"loss": {"target_self_prob": 0.5}})
    with pytest.raises(ConfigError, match="tau_text must be > 0"):
        LossConfig(tau_text=0.0)


# ----------------------------------------------------------------------------------------------- contrastive


def test_view_loss_matches_loop_single_and_multi_site():
    z0, z1, y = unit(5, 4, seed=6), unit(5, 4, seed=7), soft_rows(8)
    assert view_loss(z0, z1, y, 0.2).item() == pytest.approx(naive_symmetric(z0, z1, y, 1 / 0.2), rel=1e-10)
    a, b = unit(5, 3, 4, seed=9), unit(5, 3, 4, seed=10)  # (B, K, E)
    expected = sum(naive_symmetric(a[:, k], b[:, k], y, 1 / 0.2) for k in range(3)) / 3
    assert view_loss(a, b, y, 0.2).item() == pytest.approx(expected, rel=1e-10)


def test_align_loss_matches_loop_and_scale_gets_a_gradient():
    u, t, y = unit(5, 4, seed=11), unit(5, 4, seed=12), soft_rows(13)
    scale = torch.tensor(7.0, dtype=DT, requires_grad=True)
    loss = align_loss(u, t, y, scale)
    assert loss.item() == pytest.approx(naive_symmetric(u, t, y, 7.0), rel=1e-10)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_distinct_report_targets_reduce_to_infonce_and_clip():
    s = unit(6, 8, seed=14)
    y = text_affinity_targets(s, 0.9, 0.2, 0.05)
    z0, z1 = unit(6, 4, seed=15), unit(6, 4, seed=16)
    labels = torch.arange(6)
    infonce = 0.5 * (F.cross_entropy(z0 @ z1.T / 0.1, labels) + F.cross_entropy(z1 @ z0.T / 0.1, labels))
    torch.testing.assert_close(view_loss(z0, z1, y, 0.1), infonce)
    clip = 0.5 * (F.cross_entropy(20 * z0 @ z1.T, labels) + F.cross_entropy(20 * z1 @ z0.T, labels))
    torch.testing.assert_close(align_loss(z0, z1, y, 20.0), clip)
    torch.testing.assert_close(align_loss(z0, z1, hard_targets(6).to(DT), 20.0), clip)


def test_soft_targets_punish_matching_a_same_report_study_less():
    """Two studies with identical reports: confusing them costs less under soft targets than under hard ones."""
    s = unit(4, 8, seed=17)
    s[2] = s[0]
    y = text_affinity_targets(s, 0.9, 0.5, 0.05)
    z = unit(4, 4, seed=18)
    swapped = z.clone()
    swapped[[0, 2]] = z[[2, 0]]  # view 1 of study 0 looks like study 2 and vice versa
    hard = hard_targets(4).to(DT)
    soft_cost = view_loss(z, swapped, y, 0.1).item() - view_loss(z, z, y, 0.1).item()
    hard_cost = view_loss(z, swapped, hard, 0.1).item() - view_loss(z, z, hard, 0.1).item()
    assert hard_cost > 0.5 and soft_cost < 0.6 * hard_cost


def test_sentence_align_loss_matches_loop():
    b, m = 3, 4
    crops, sent = unit(b, m, 5, seed=19), unit(7, 5, seed=20)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    y = soft_rows(21, b)
    scores = naive_sentence_scores(crops, sent, owner, b)  # [study][report]
    img2txt = [[5.0 * v for v in row] for row in scores]
    txt2img = [[5.0 * scores[i][j] for i in range(b)] for j in range(b)]
    expected = 0.5 * (naive_soft_ce(img2txt, y) + naive_soft_ce(txt2img, y))
    assert sentence_align_loss(crops, sent, owner, y, 5.0).item() == pytest.approx(expected, rel=1e-10)


def test_sentence_align_loss_names_a_study_without_sentences():
    with pytest.raises(ValueError, match="at least one sentence"):
        sentence_align_loss(unit(3, 2, 4), unit(2, 4), torch.tensor([0, 2]), hard_targets(3).to(DT), 5.0)


def test_targets_of_the_wrong_shape_are_explained():
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        view_loss(unit(4, 3), unit(4, 3), hard_targets(5), 0.1)


# ----------------------------------------------------------------------------------------------- restoration


def test_random_cube_mask_ratio_blocks_and_determinism():
    shape = (3, 1, 32, 32, 16)
    mask = random_cube_mask(shape, 0.5, 8, torch.Generator().manual_seed(0))
    assert mask.shape == shape and mask.dtype == torch.bool
    # 4*4*2 = 32 cells, exactly 16 hidden in each sample, and cells are whole 8^3 cubes
    assert mask.flatten(1).float().mean(1).tolist() == [0.5, 0.5, 0.5]
    cells = mask[:, 0].reshape(3, 4, 8, 4, 8, 2, 8)
    assert bool((cells.all(dim=(2, 4, 6)) == cells.any(dim=(2, 4, 6))).all())
    again = random_cube_mask(shape, 0.5, 8, torch.Generator().manual_seed(0))
    other = random_cube_mask(shape, 0.5, 8, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)
    assert not torch.equal(mask[0], mask[1])  # samples get independent masks


def test_random_cube_mask_sizes_not_divisible_by_block():
    mask = random_cube_mask((20, 13, 9), 0.4, 8, torch.Generator().manual_seed(2))
    assert mask.shape == (20, 13, 9)
    fractions = [
        random_cube_mask((4, 1, 37, 29, 21), 0.5, 6, torch.Generator().manual_seed(i)).float().mean().item()
        for i in range(5)
    ]
    assert abs(sum(fractions) / 5 - 0.5) < 0.08


def test_corrupt_hides_masked_voxels_and_keeps_the_rest():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 2, 8, 8, 8, generator=g) + 0.5
    mask = random_cube_mask(x.shape, 0.5, 4, g)
    out = corrupt(x, mask)
    assert bool((out[mask.expand_as(x)] == 0).all())
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    noisy = corrupt(x, mask, noise_std=0.1, generator=torch.Generator().manual_seed(4))
    assert 0.05 < (noisy - out).std().item() < 0.15


def test_restoration_loss_matches_loop():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.rand(2, 2, 4, 4, 4, generator=g, dtype=DT), torch.rand(2, 2, 4, 4, 4, generator=g, dtype=DT)
    mask = random_cube_mask(pred.shape, 0.5, 2, g)
    hid, vis = [], []
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in pred.shape)).tolist():
        n, c, d, h, w = idx
        err = abs(float(pred[n, c, d, h, w]) - float(target[n, c, d, h, w]))
        (hid if bool(mask[n, 0, d, h, w]) else vis).append(err)
    expected = sum(hid) / len(hid) + 0.1 * sum(vis) / len(vis)
    assert restoration_loss(pred, target, mask, 0.1).item() == pytest.approx(expected, rel=1e-10)
    assert restoration_loss(pred, target, mask, 0.0).item() == pytest.approx(sum(hid) / len(hid), rel=1e-10)


# ----------------------------------------------------------------------------------------------- methods, objective


def test_method_table_covers_every_method_with_the_right_flags():
    assert {m: method_spec(m).name for m in METHODS} == {m: m for m in METHODS}
    flags = {m: (s.view, s.soft_targets, s.align, s.restore, s.whole_volume) for m in METHODS if (s := method_spec(m))}
    assert flags["t3d"] == (True, True, "global", True, False)
    assert flags["t3d-no-align"] == (True, True, "none", True, False)
    assert flags["t3d-hard"] == (True, False, "global", True, False)
    assert flags["t3d-sentence"] == (True, True, "sentence", True, False)
    assert flags["t3d-crops"] == flags["t3d"] and flags["t3d-crops-sentence"] == flags["t3d-sentence"]
    # t3d and every ablation of its text terms take the study embedding from the tile grid; *-crops from random crops
    tiled = {m for m in METHODS if method_spec(m).tiles}
    assert tiled == {"t3d", "t3d-hard", "t3d-sentence", "t3d-cross-attention", "t3d-uncond"}
    assert flags["vssl"] == (True, False, "none", True, False)
    assert flags["vssl-contrastive"] == (True, False, "none", False, False)
    assert flags["vssl-restore"] == (False, False, "none", True, False)
    assert flags["clip"] == (False, False, "global", False, True)
    assert flags["supervised"] == (False, False, "none", False, False) and method_spec("supervised").findings
    assert not method_spec("supervised").uses_text and not method_spec("supervised").contrastive
    assert method_spec("t3d").conditioning_for("film") == "film"
    assert method_spec("t3d-cross-attention").conditioning_for("film") == "cross_attention"
    assert method_spec("t3d-uncond").conditioning_for("film") == "none"
    assert method_spec("vssl").conditioning_for("film") == "none"
    assert not method_spec("vssl").uses_text and method_spec("t3d-uncond").uses_text and method_spec("clip").uses_text
    with pytest.raises(ValueError, match="simclr.*t3d"):
        method_spec("simclr")


def model_outputs(b=4, k=2, e=6, seed=30):
    g = torch.Generator().manual_seed(seed)
    crop = F.normalize(torch.randn(b, k, 2, e, generator=g, dtype=DT), dim=-1).requires_grad_()
    target = torch.rand(b * k * 2, 1, 8, 8, 8, generator=g, dtype=DT)
    return {
        "crop_emb": crop,
        "study_emb": F.normalize(crop.mean(dim=(1, 2)), dim=-1),
        "text_emb": unit(b, e, seed=seed + 1),
        "frozen_text": unit(b, 10, seed=seed + 2)[[0, 1, 0, 3]],  # studies 0 and 2: same report, so Y != I
        "sent_emb": unit(7, e, seed=seed + 3),
        "sent_owner": torch.tensor([0, 1, 1, 2, 3, 3, 3]),
        "logit_scale": torch.tensor(12.0, dtype=DT),
        "restored": torch.rand(b * k * 2, 1, 8, 8, 8, generator=g, dtype=DT).requires_grad_(),
        "target": target,
        "mask": random_cube_mask(target.shape, 0.5, 4, g),
        "finding_logits": torch.randn(b, 3, generator=g, dtype=DT).requires_grad_(),
        "finding_targets": (torch.rand(b, 3, generator=g) < 0.5).to(DT),
        "tile_emb": F.normalize(torch.randn(b, 3, e, generator=g, dtype=DT), dim=-1),  # tiled methods, T = 3
        "tile_mask": torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool),
    }


EXPECTED_KEYS = {
    "t3d": {"view", "align", "tcl", "restore"},
    "t3d-crops": {"view", "align", "tcl", "restore"},
    "t3d-crops-sentence": {"view", "align", "tcl", "restore"},
    "t3d-no-align": {"view", "tcl", "restore"},
    "t3d-hard": {"view", "align", "tcl", "restore"},
    "t3d-sentence": {"view", "align", "tcl", "restore"},
    "t3d-cross-attention": {"view", "align", "tcl", "restore"},
    "t3d-uncond": {"view", "align", "tcl", "restore"},
    "vssl": {"view", "tcl", "restore"},
    "vssl-contrastive": {"view", "tcl"},
    "vssl-restore": {"restore"},
    "clip": {"align", "tcl"},
    "supervised": {"findings"},
}


@pytest.mark.parametrize("method", METHODS)
def test_objective_terms_and_weighting(method):
    cfg = LossConfig(lambda_tcl=0.7, lambda_align=0.3, lambda_tir=2.0, tau_view=0.2, visible_weight=0.1)
    spec = method_spec(method)
    out = model_outputs()
    terms = PretrainObjective(cfg, spec)(out)
    diagnostics = ({"target_self_prob", "target_entropy"} if spec.contrastive else set()) | (
        {"tau_align"} if spec.align != "none" else set()
    )
    diagnostics |= {"study_cos"} if spec.align == "global" else set()
    assert set(terms) == EXPECTED_KEYS[method] | {"loss"} | diagnostics
    assert list(terms) == PretrainObjective(cfg, spec).term_names()
    y = text_affinity_targets(out["frozen_text"], 0.9, 0.2, 0.05) if spec.soft_targets else hard_targets(4).to(DT)
    z = out["crop_emb"]
    manual = {"view": view_loss(z[:, :, 0], z[:, :, 1], y, 0.2)}
    if spec.align == "sentence" and spec.tiles:  # each sentence against its best real tile
        tiles, mask = out["tile_emb"], out["tile_mask"]
        manual["align"] = sentence_align_loss(tiles, out["sent_emb"], out["sent_owner"], y, 12.0, crop_mask=mask)
        padded = tiles.masked_fill(~mask[..., None], 0.0) + 10.0 * (~mask[..., None])  # padding would win the max
        assert not torch.allclose(
            manual["align"], sentence_align_loss(padded, out["sent_emb"], out["sent_owner"], y, 12.0)
        )
    elif spec.align == "sentence":
        manual["align"] = sentence_align_loss(z.flatten(1, 2), out["sent_emb"], out["sent_owner"], y, 12.0)
    else:
        manual["align"] = align_loss(out["study_emb"], out["text_emb"], y, 12.0)
    manual["restore"] = restoration_loss(out["restored"], out["target"], out["mask"], 0.1)
    manual["findings"] = F.binary_cross_entropy_with_logits(out["finding_logits"], out["finding_targets"])
    for key in EXPECTED_KEYS[method] - {"tcl"}:
        torch.testing.assert_close(terms[key], manual[key])
    tcl = terms.get("view", 0.0) + 0.3 * terms.get("align", 0.0)
    expected = 0.7 * tcl + 2.0 * terms.get("restore", 0.0) + terms.get("findings", 0.0)
    torch.testing.assert_close(terms["loss"], expected)
    if "tau_align" in terms:
        assert terms["tau_align"].item() == pytest.approx(1 / 12)
    if "study_cos" in terms:
        u = F.normalize(out["study_emb"], dim=-1)
        assert terms["study_cos"].item() == pytest.approx(((u @ u.T).sum() - 4).item() / 12, rel=1e-5)
    if spec.contrastive:
        assert terms["target_self_prob"].item() == pytest.approx(target_self_prob(y).item())
        assert terms["target_entropy"].item() == pytest.approx(target_entropy(y).item())
    terms["loss"].backward()


def test_objective_names_missing_outputs():
    objective = PretrainObjective(LossConfig(), method_spec("t3d-sentence"))
    out = model_outputs()
    del out["sent_owner"]
    with pytest.raises(KeyError, match="sent_owner"):
        objective(out)
    out = model_outputs()
    del out["logit_scale"]  # falls back to the fixed 1 / tau_align
    terms = PretrainObjective(LossConfig(tau_align=0.05), method_spec("clip"))(out)
    assert terms["tau_align"].item() == pytest.approx(0.05)


def test_objective_is_computed_in_float32_under_bf16_autocast():
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in model_outputs().items()}
    objective = PretrainObjective(LossConfig(), method_spec("t3d-sentence"))
    plain = objective(out)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = objective(out)
    for key in plain:
        assert autocast[key].dtype == torch.float32
        torch.testing.assert_close(autocast[key], plain[key])


def test_study_cos_reads_one_for_a_collapsed_batch_and_about_zero_for_orthogonal_rows():
    from t3d.losses.objective import mean_pairwise_cosine

    same = torch.ones(4, 8) + 1e-6 * torch.randn(4, 8)
    assert mean_pairwise_cosine(same).item() == pytest.approx(1.0, abs=1e-4)
    assert mean_pairwise_cosine(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-7)
    u = torch.randn(5, 3)
    loop = sum(torch.cosine_similarity(u[i], u[j], dim=0) for i in range(5) for j in range(5) if i != j) / 20
    assert mean_pairwise_cosine(u).item() == pytest.approx(loop.item(), rel=1e-5)
