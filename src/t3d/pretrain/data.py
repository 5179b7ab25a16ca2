"""What a pre-training step reads: crops (plus the study's tiles for tiled methods, or whole volumes for ``clip``)
and the cached frozen report features."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from t3d import distributed as dist
from t3d.config import PretrainConfig
from t3d.data.cache import StudyCache
from t3d.data.crops import CropDataset, WholeVolumeDataset
from t3d.data.targets import finding_label_classes, read_findings
from t3d.data.tiles import TiledCropDataset
from t3d.losses import MethodSpec, near_duplicate_share, target_entropy, text_affinity_targets
from t3d.text import clean_report, load_text_features, split_sections

log = logging.getLogger(__name__)


def split_ids(cfg: PretrainConfig) -> list[str] | None:
    """Study ids of ``data.split`` in ``data.split_file``; None = every cached study."""
    if not cfg.data.split_file:
        return None
    path = Path(cfg.data.split_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.split_file {path} does not exist")
    splits = json.loads(path.read_text())
    if cfg.data.split not in splits:
        raise ValueError(f"data.split '{cfg.data.split}' is not in {path}; it holds: {', '.join(splits)}")
    return list(splits[cfg.data.split])


def build_dataset(cfg: PretrainConfig, spec: MethodSpec):
    ids = split_ids(cfg)
    if spec.whole_volume:
        # The same augmentation policy as the crop methods (crops.flip_axes, intensity jitter).
        return WholeVolumeDataset(
            cfg.data.cache, grid=cfg.clip.grid, windows=cfg.crops.windows, ids=ids, augment=cfg.crops, seed=cfg.seed
        )
    if spec.tiles:
        return TiledCropDataset(cfg.data.cache, cfg.crops, cfg.tiles, ids=ids, seed=cfg.seed)
    counted = tuple(local_finding_labels(cfg).values()) if spec.findings else ()
    return CropDataset(cfg.data.cache, cfg.crops, ids=ids, seed=cfg.seed, count_labels=counted)


def local_finding_labels(cfg: PretrainConfig, classes: list[str] | None = None) -> dict[str, int]:
    """Finding name -> label value of the findings that the ``supervised`` control targets per crop (empty for
    ``data.finding_targets: study``). ``classes``: the findings file's class names, when already read."""
    if cfg.data.finding_targets == "study":
        return {}
    if classes is None:
        _, classes, _ = read_findings(cfg.data.findings)
    return finding_label_classes(cfg.data.findings, classes, cfg.data.finding_labels)


def report_text(row: dict, sections: str) -> str:
    """The report of one cache-index row restricted to ``text.sections``."""
    findings, impression = row.get("findings") or "", row.get("impression") or ""
    if not findings and not impression:
        findings, impression = split_sections(row.get("report") or "")
    return clean_report(findings, impression, sections)


class TextLookup:
    """Frozen, centred report features of the training studies, indexed by cache-index row.

    The corpus mean is taken over the *training* reports only (kept in checkpoints as ``text_mean``).
    """

    def __init__(self, cfg: PretrainConfig, spec: MethodSpec, rows: list[int], reports: list[str], device):
        cache_dir = cfg.text.cache_dir or str(Path(cfg.data.cache) / "text")
        conditioning = spec.conditioning or cfg.model.conditioning
        want = {"tokens": spec.restore and conditioning == "cross_attention", "sentences": spec.align == "sentence"}
        # Rank 0 fills the on-disk cache first; the others then only read it.
        if dist.is_main():
            feats = load_text_features(reports, cfg.text, cache_dir, **want)
        dist.barrier()
        if not dist.is_main():
            feats = load_text_features(reports, cfg.text, cache_dir, progress=False, **want)
        self.model_id = feats.model_id
        self.dim = feats.pooled.shape[1]
        self.mean = feats.mean
        self.frozen = feats.centred().to(device)  # (N, Et)
        self.position = torch.full((max(rows) + 1,), -1, dtype=torch.long)
        self.position[torch.tensor(rows)] = torch.arange(len(rows))
        self.tokens = feats.tokens.to(device) if want["tokens"] else None
        self.token_mask = feats.token_mask.to(device) if want["tokens"] else None
        self.sent, self.sent_ranges, self.sent_mean = None, None, None
        if want["sentences"]:
            self.sent = feats.centred_sentences().to(device)  # (S, Et)
            # sent_owner is sorted (sentences are stored report by report): ranges from cumulative counts.
            ends = torch.bincount(feats.sent_owner, minlength=len(rows)).cumsum(0).tolist()
            self.sent_ranges = [torch.arange(a, b) for a, b in zip([0, *ends[:-1]], ends)]
            self.sent_mean = feats.sent_mean
        if spec.soft_targets:
            self._log_targets(cfg, dist.world_size() * cfg.train.batch_size)

    def _log_targets(self, cfg: PretrainConfig, batch: int) -> None:
        """How much target mass the corpus shares: near-duplicate pairs and H(Y) of one probe batch."""
        loss = cfg.loss
        frozen = self.frozen.cpu()
        probe = frozen[torch.randperm(len(frozen), generator=torch.Generator().manual_seed(0))[:batch]]
        y = text_affinity_targets(probe, loss.affinity_threshold, loss.affinity_alpha, loss.tau_text)
        log.info(
            "text targets: %.2f %% of report pairs are near-duplicates (cosine >= %.2f); H(Y) of a batch of %d = %.3f",
            100 * near_duplicate_share(frozen, loss.affinity_threshold),
            loss.affinity_threshold,
            batch,
            float(target_entropy(y)),
        )

    def for_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        pos = self.position[batch["index"].cpu()]
        if (pos < 0).any():
            raise ValueError("a batch holds a study without text features (was the split changed mid-run?)")
        out = {"frozen": self.frozen[pos.to(self.frozen.device)]}
        if self.tokens is not None:
            out["tokens"] = self.tokens[pos.to(self.tokens.device)]
            out["token_mask"] = self.token_mask[pos.to(self.tokens.device)]
        if self.sent is not None:
            picks = [self.sent_ranges[int(p)] for p in pos]
            out["sent"] = self.sent[torch.cat(picks).to(self.sent.device)]
            owner = torch.cat([torch.full((len(r),), b, dtype=torch.long) for b, r in enumerate(picks)])
            out["sent_owner"] = owner.to(self.sent.device)
        return out


def build_text_lookup(cfg: PretrainConfig, spec: MethodSpec, dataset, device) -> TextLookup:
    index = StudyCache(cfg.data.cache).index()
    rows = sorted(int(row) for row, _ in dataset.studies)
    reports = [report_text(index[i], cfg.text.sections) for i in rows]
    empty = [index[i]["id"] for i, r in zip(rows, reports) if not r.strip()]
    if empty:
        raise ValueError(
            f"{len(empty)} studies have no text in text.sections='{cfg.text.sections}' (e.g. {empty[0]}); "
            "set text.sections=both or remove them"
        )
    return TextLookup(cfg, spec, rows, reports, device)


class FindingTargets:
    """Per-crop targets of the ``supervised`` control from the ground-truth findings of the training studies
    (``data.findings``), indexed by cache-index row.

    A finding with a label class of its own (``local_finding_labels``) is positive for a crop when the crop holds at
    least ``data.finding_min_voxels`` voxels of that class (the batch's ``label_voxels``, counted by the dataset in
    the study's label map); every other finding is the study's label for each of its crops. A study without a label
    map is an error rather than a silent fall-back to study labels: a study-level target is a weak signal for a
    lesion that is a few voxels of one crop of many, so that control would not be the upper reference it claims to
    be (``data.finding_targets: study`` asks for it explicitly)."""

    def __init__(self, cfg: PretrainConfig, dataset, device):
        ids, self.classes, y = read_findings(cfg.data.findings)
        row_of = {row["id"]: int(n) for n, row in dataset.studies}
        missing = [i for i in row_of if i not in set(ids)]
        if missing:
            raise ValueError(
                f"{len(missing)} training studies have no findings in {cfg.data.findings} (e.g. {missing[0]}); the "
                "supervised control needs a label for every pre-training study"
            )
        self.y = torch.zeros(max(row_of.values()) + 1, len(self.classes))
        for study, labels in zip(ids, y):
            if study in row_of:
                self.y[row_of[study]] = torch.from_numpy(labels)
        self.y = self.y.to(device)
        self.local = local_finding_labels(cfg, self.classes)
        self.columns = torch.tensor([self.classes.index(name) for name in self.local], dtype=torch.long)
        self.min_voxels = cfg.data.finding_min_voxels
        if self.local:
            _check_label_maps(cfg, dataset, self.local)
        elif cfg.data.finding_targets == "crop":
            log.warning(
                "supervised control: no finding of %s has a label class (data.finding_labels is empty), so every "
                "finding is a study-level target of each crop",
                cfg.data.findings,
            )
        log.info(
            "supervised control: %d findings (%s) for %d studies; per crop from the label maps: %s",
            len(self.classes),
            ", ".join(self.classes),
            len(row_of),
            ", ".join(f"{k} (label {v})" for k, v in self.local.items()) or "none",
        )

    def for_batch(self, batch: dict) -> torch.Tensor:
        """(B, K, L) 0/1 targets of the batch's K crop sites (view 0, the one the control encodes)."""
        study = self.y[batch["index"].to(self.y.device)]  # (B, L)
        k = batch["views"].shape[1]
        y = study[:, None].repeat(1, k, 1)
        if self.local:
            voxels = batch["label_voxels"][:, :, 0].to(self.y.device)  # (B, K, J)
            y[:, :, self.columns.to(self.y.device)] = (voxels >= self.min_voxels).to(y.dtype)
        return y


def _check_label_maps(cfg: PretrainConfig, dataset, local: dict[str, int]) -> None:
    studies = dataset.cache.studies
    unlabelled = [row["id"] for _, row in dataset.studies if not (studies / row["key"] / "label.npy").is_file()]
    if unlabelled:
        raise ValueError(
            f"method=supervised targets {', '.join(local)} per crop from the label maps, but {len(unlabelled)} of "
            f"{len(dataset.studies)} training studies have no label map in the cache {cfg.data.cache} (e.g. "
            f"{unlabelled[0]}): add a label column to {cfg.data.manifest or 'the manifest'} and preprocess again, or "
            "set data.finding_targets=study to train every crop on its study's findings (a weaker control)"
        )
