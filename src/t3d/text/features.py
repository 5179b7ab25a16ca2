"""Frozen text features, computed once and cached on disk (docs/method.md §2), and their corpus-mean centring.

    feats = load_text_features(reports, cfg.text, cache_dir, tokens=False, sentences=False)
    s = feats.centred()            # (N, Et) = normalise(pooled - mean): what the projection and Y see
    ckpt["text_mean"] = feats.mean # the centring travels with the checkpoint

**Why centre.** Sentence encoders are anisotropic: every embedding shares a large common direction, so templated CT
reports all look alike. all-MiniLM-L6-v2 puts templated CT reports at mean pairwise cosine ~0.78 (docs/method.md §2);
then the text-affinity targets Y = softmax((S - 1) / tau) are nearly uniform and a contrastive loss on the raw
embeddings has almost nothing to separate. Subtracting the corpus mean removes the shared
direction and leaves what differs between reports. Measured in tests/test_text.py (``templated_ct_reports``: 20
templated CT reports, 4 of them the same normal report; MiniLM, mean pooling), off-diagonal cosine:

                mean    p95
    raw         0.62    0.89
    centred    -0.05    0.71   (p95 stays high: identical and near-identical reports remain alike, as they should)

**Sentences** (``align: sentence``) are centred by the mean of the *sentence* corpus (``sent_mean``), not the
report mean: one-finding sentences share a different common direction than whole reports, and centring them with
the report mean leaves that offset in every sentence. On the same reports (120 sentences) the sentence cosine mean
is 0.33 raw, 0.12 centred with the report mean and 0.00 with the sentence mean. Both means go into checkpoints.

**Cache.** ``<cache_dir>/<feature-key slug>/``, where the feature key is the encoder's model id + pooling +
max_length (all three change the numbers). Features are stored in safetensors shards: ``pooled-<h>.safetensors``
(pooled (n, Et) float32) and ``tokens-<h>.safetensors`` (valid tokens concatenated (sum l_i, Et) float32 + offsets,
only written when ``tokens=True``); each shard lists the sha256 of its texts in its header metadata, so the shard
headers are the index. Every file is written to a temporary name and renamed (atomic), so an interrupted run
leaves only whole shards and resumes where it stopped. Only texts whose hash is missing are encoded (the encoder is
not even loaded when nothing is missing). Logs carry counts and hashes, never report text. In distributed runs let
rank 0 fill the cache before the other ranks read it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from t3d.config import ConfigError, TextConfig
from t3d.text.encoder import FrozenTextEncoder, resolve_text_model
from t3d.text.reports import report_hash, split_sentences

log = logging.getLogger(__name__)

FORMAT = "t3d-text-features-v1"
SHARD_SIZE = 1024  # texts per shard file
CHUNK = 256  # texts per encoder call (progress bar granularity)


@dataclass
class TextFeatures:
    """Frozen text features of a corpus, in the order of the reports given to :func:`load_text_features`.

    pooled: (N, Et) raw frozen report embeddings, float32.
    mean: (Et,) corpus mean of ``pooled`` (goes into checkpoints; centre new text with it at inference).
    tokens / token_mask: (N, L, Et) float32 / (N, L) bool token features, L <= text.max_length, or None.
    sent / sent_owner: (S, Et) raw sentence embeddings / (S,) long report index of each sentence, or None;
        sentences are grouped by report in order (sent_owner is non-decreasing, so report i owns one contiguous
        run: ``torch.bincount(sent_owner, minlength=N).cumsum(0)`` gives the run ends), and every report owns at
        least one sentence (the whole report when it has no sentence boundary).
    model_id: the encoder's model id. sent_mean: (Et,) mean of ``sent`` or None.
    """

    pooled: torch.Tensor
    mean: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    sent: torch.Tensor | None = None
    sent_owner: torch.Tensor | None = None
    model_id: str = ""
    sent_mean: torch.Tensor | None = None

    def centred(self) -> torch.Tensor:
        """(N, Et) unit vectors normalise(pooled - mean): the frozen report embedding s of docs/method.md §4."""
        return F.normalize(self.pooled - self.mean, dim=-1)

    def centred_sentences(self) -> torch.Tensor:
        """(S, Et) unit vectors normalise(sent - sent_mean); sentence corpus mean, see the module docstring."""
        if self.sent is None or self.sent_mean is None:
            raise ValueError("no sentence features: call load_text_features(..., sentences=True)")
        return F.normalize(self.sent - self.sent_mean, dim=-1)

    def similarity_stats(self, max_rows: int = 2048) -> dict[str, float]:
        """Off-diagonal cosine mean and 95th percentile of the raw and the centred report embeddings.

        For logs and docs: raw_mean ~0.7-0.8 on templated reports, centred_mean ~0. At most ``max_rows`` reports
        (a fixed random subset) are compared, so this stays cheap on large corpora.
        """
        n = self.pooled.shape[0]
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_rows] if n > max_rows else None
        stats = {}
        for name, emb in (("raw", F.normalize(self.pooled, dim=-1)), ("centred", self.centred())):
            emb = emb if rows is None else emb[rows]
            cos = emb @ emb.T  # (n, n)
            off = cos[~torch.eye(cos.shape[0], dtype=torch.bool)]
            stats[f"{name}_mean"] = float(off.mean()) if off.numel() else float("nan")
            stats[f"{name}_p95"] = float(torch.quantile(off, 0.95)) if off.numel() else float("nan")
        return stats


def load_text_features(
    reports: list[str],
    cfg: TextConfig,
    cache_dir: str | os.PathLike | None = None,
    tokens: bool = False,
    sentences: bool = False,
    progress: bool = True,
) -> TextFeatures:
    """Frozen features of ``reports`` (already cleaned, see :func:`~t3d.text.reports.clean_report`), cached.

    Args:
        reports: N report texts; duplicates are encoded once.
        cfg: ``text`` config (model, pooling, max_length, batch_size, cache_dir).
        cache_dir: cache root; ``None`` or ``""`` uses ``cfg.cache_dir``.
        tokens: also return token features (cross-attention conditioning); stored only when asked for.
        sentences: also split every report into sentences (:func:`split_sentences`) and return their embeddings.
        progress: show a progress bar over the texts that have to be encoded.
    """
    if not reports:
        raise ValueError("load_text_features: no reports given")
    root = Path(cache_dir or cfg.cache_dir or "")
    if not str(root) or str(root) == ".":
        raise ConfigError("text.cache_dir is empty and no cache_dir was given; set text.cache_dir to a folder")
    resolved = resolve_text_model(cfg.model)
    store = FeatureStore(root, resolved.model_id, cfg.pooling, cfg.max_length)

    report_keys = [report_hash(r) for r in reports]
    sent_texts, owners = _sentences(reports) if sentences else ([], [])
    sent_keys = [report_hash(s) for s in sent_texts]
    texts = dict(zip(report_keys + sent_keys, list(reports) + sent_texts))  # hash -> text, deduplicated
    need_pooled = [k for k in texts if not store.has("pooled", k)]
    need_tokens = {k for k in dict.fromkeys(report_keys) if not store.has("tokens", k)} if tokens else set()
    todo = list(dict.fromkeys(need_pooled + sorted(need_tokens)))
    log.info(
        "text features %s: %d reports (%d unique), %d sentences, %d texts cached, %d to encode; cache %s",
        store.key, len(reports), len(set(report_keys)), len(sent_keys), len(texts) - len(todo), len(todo), store.root,
    )  # fmt: skip
    if todo:
        _encode_missing(store, cfg, {k: texts[k] for k in todo}, set(need_pooled), need_tokens, progress)

    pooled = store.read_pooled(report_keys)  # (N, Et)
    feats = TextFeatures(pooled=pooled, mean=pooled.double().mean(0).float(), model_id=resolved.model_id)
    if tokens:
        feats.tokens, feats.token_mask = store.read_tokens(report_keys)
    if sentences:
        feats.sent = store.read_pooled(sent_keys)  # (S, Et)
        feats.sent_owner = torch.tensor(owners, dtype=torch.long)
        feats.sent_mean = feats.sent.double().mean(0).float()
    store.write_corpus_mean(report_keys, feats.mean, feats.sent_mean)
    return feats


def _sentences(reports: list[str]) -> tuple[list[str], list[int]]:
    """All sentences of all reports and the index of the report each belongs to (>= 1 per report)."""
    texts, owners = [], []
    for i, report in enumerate(reports):
        found = split_sentences(report) or [report]
        texts += found
        owners += [i] * len(found)
    return texts, owners


def _encode_missing(
    store: FeatureStore, cfg: TextConfig, texts: dict[str, str], need_pooled: set, need_tokens: set, progress: bool
) -> None:
    """Encode ``texts`` (hash -> text) in chunks and write shards of at most SHARD_SIZE texts as they fill."""
    encoder = FrozenTextEncoder(
        cfg.model, cfg.pooling, cfg.max_length, device=cfg.device, trust_remote_code=cfg.trust_remote_code
    )
    keys = list(texts)
    pending: dict[str, list] = {"pooled": [], "tokens": []}
    with tqdm(total=len(keys), desc="text features", unit="text", disable=not progress) as bar:
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start : start + CHUNK]
            want_tokens = any(k in need_tokens for k in chunk)
            pooled, tok, mask = encoder.encode([texts[k] for k in chunk], cfg.batch_size, tokens=want_tokens)
            for row, key in enumerate(chunk):
                if key in need_pooled:
                    pending["pooled"].append((key, pooled[row]))
                if key in need_tokens:
                    pending["tokens"].append((key, tok[row][mask[row]]))
            for kind in pending:
                while len(pending[kind]) >= SHARD_SIZE:
                    store.write(kind, pending[kind][:SHARD_SIZE])
                    pending[kind] = pending[kind][SHARD_SIZE:]
            bar.update(len(chunk))
    for kind, rows in pending.items():
        if rows:
            store.write(kind, rows)
    if encoder.num_truncated:
        log.info(
            "text features: %d of %d texts filled text.max_length=%d tokens and lost their end (raise it, or use "
            "text.sections=impression)", encoder.num_truncated, len(keys), encoder.max_length,
        )  # fmt: skip


class FeatureStore:
    """One feature key's folder of safetensors shards; the shard headers (text hashes) are the index."""

    def __init__(self, cache_root: Path, model_id: str, pooling: str, max_length: int) -> None:
        self.key = f"{model_id}|{pooling}|{max_length}"
        slug = re.sub(r"[^A-Za-z0-9.@-]+", "_", f"{model_id}__{pooling}_{max_length}")
        self.root = Path(cache_root) / f"{slug}-{report_hash(self.key)[:8]}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_meta(model_id, pooling, max_length)
        # kind -> text hash -> (shard path, row)
        self.index: dict[str, dict[str, tuple[Path, int]]] = {"pooled": {}, "tokens": {}}
        for kind in self.index:
            for shard in sorted(self.root.glob(f"{kind}-*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("key") != self.key:
                    log.warning("text cache: ignoring %s (format or feature key does not match)", shard.name)
                    continue
                for row, key in enumerate(filter(None, meta.get("hashes", "").split(","))):
                    self.index[kind].setdefault(key, (shard, row))

    def _check_meta(self, model_id: str, pooling: str, max_length: int) -> None:
        meta = {"format": FORMAT, "key": self.key, "model_id": model_id, "pooling": pooling, "max_length": max_length}
        path = self.root / "meta.json"
        if path.exists():
            found = json.loads(path.read_text())
            if found.get("key") != self.key:
                raise RuntimeError(f"text cache {self.root} belongs to {found.get('key')!r}, not {self.key!r}")
            return
        _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    def has(self, kind: str, key: str) -> bool:
        return key in self.index[kind]

    def write(self, kind: str, rows: list[tuple[str, torch.Tensor]]) -> None:
        """Write one shard of (text hash, features) rows: pooled rows (Et,) or token rows (l_i, Et)."""
        keys = [k for k, _ in rows]
        shard = self.root / f"{kind}-{report_hash(','.join(keys))[:16]}.safetensors"
        if kind == "pooled":
            tensors = {"pooled": torch.stack([t for _, t in rows]).float().contiguous()}
        else:
            lengths = torch.tensor([t.shape[0] for _, t in rows], dtype=torch.long)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            tensors = {"tokens": torch.cat([t for _, t in rows]).float().contiguous(), "offsets": offsets}
        meta = {"format": FORMAT, "key": self.key, "kind": kind, "hashes": ",".join(keys)}
        _atomic_write(shard, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        for row, key in enumerate(keys):
            self.index[kind].setdefault(key, (shard, row))
        log.debug("text cache: wrote %s (%d texts)", shard.name, len(keys))

    def read_pooled(self, keys: list[str]) -> torch.Tensor:
        """(len(keys), Et) pooled features in the order of ``keys``."""
        by_shard = self._group("pooled", keys)
        out: torch.Tensor | None = None
        for shard, wanted in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                data = f.get_tensor("pooled")
            out = torch.empty(len(keys), data.shape[1]) if out is None else out
            out[[i for i, _ in wanted]] = data[[r for _, r in wanted]]
        return out

    def read_tokens(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(keys), L, Et) token features zero-padded to the longest text, and the (len(keys), L) bool mask."""
        rows: list[torch.Tensor | None] = [None] * len(keys)
        for shard, wanted in self._group("tokens", keys).items():
            with safe_open(str(shard), framework="pt") as f:
                offsets = f.get_tensor("offsets")
                sliced = f.get_slice("tokens")
                for i, r in wanted:
                    rows[i] = sliced[int(offsets[r]) : int(offsets[r + 1])]
        length, dim = max(t.shape[0] for t in rows), rows[0].shape[1]
        feats = torch.zeros(len(keys), length, dim)
        mask = torch.zeros(len(keys), length, dtype=torch.bool)
        for i, t in enumerate(rows):
            feats[i, : t.shape[0]], mask[i, : t.shape[0]] = t, True
        return feats, mask

    def _group(self, kind: str, keys: list[str]) -> dict[Path, list[tuple[int, int]]]:
        """Shard -> [(position in keys, row in shard)]; raises if a key is missing (a bug, not a user error)."""
        groups: dict[Path, list[tuple[int, int]]] = defaultdict(list)
        for i, key in enumerate(keys):
            shard, row = self.index[kind][key]
            groups[shard].append((i, row))
        return groups

    def write_corpus_mean(self, keys: list[str], mean: torch.Tensor, sent_mean: torch.Tensor | None) -> Path:
        """Keep the corpus mean next to the features it was computed from (corpus-<hash of the report hashes>)."""
        path = self.root / f"corpus-{report_hash(','.join(keys))[:16]}.safetensors"
        tensors = {"mean": mean.contiguous()} | ({"sent_mean": sent_mean.contiguous()} if sent_mean is not None else {})
        meta = {"format": FORMAT, "key": self.key, "num_reports": str(len(keys))}
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
