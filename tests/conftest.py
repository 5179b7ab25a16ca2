"""Fixtures shared by several test modules.

``one_thread``: one torch intra-op thread for the test (modules opt in with ``pytest.mark.usefixtures``).

``tiny_cache``: one synthetic ``tiny``-preset dataset (48x48x32 voxels at 5x5x6 mm) preprocessed at native spacing
into a crop cache, with its report features already in the cache's text store, built once per test session. Tests
must treat it as read-only (write runs, checkpoints and copies under their own ``tmp_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_STUDIES = 12
TINY_CROP = (32, 32, 32)


@dataclass(frozen=True)
class TinyCache:
    """Paths of the session's synthetic dataset and its crop cache."""

    data: Path
    """``t3d synth`` output (images/, labels/, reports.jsonl, pretrain.jsonl, splits.json, ...)."""
    cache: Path
    """Crop cache of *every* study in ``reports.jsonl`` (all splits), text features in ``cache/text``."""
    num_studies: int


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny convolutions on a shared 2-core machine: threads only contend; subprocess
    runs get the same through OMP_NUM_THREADS=1, so numerics match)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> TinyCache:
    from t3d.config import PreprocessConfig, TextConfig
    from t3d.data.cache import StudyCache
    from t3d.data.preprocess import preprocess_manifest
    from t3d.data.synthetic import generate_dataset
    from t3d.pretrain.data import report_text
    from t3d.text import load_text_features

    root = tmp_path_factory.mktemp("tiny_synth")
    data, cache = root / "data", root / "cache"
    generate_dataset(data, TINY_STUDIES, seed=0, preset="tiny", progress=False)
    # reports.jsonl lists every study (pretrain.jsonl only the pretrain split): more studies per contrastive batch.
    cfg = PreprocessConfig(spacing=None, min_size=TINY_CROP)
    summary = preprocess_manifest(data / "reports.jsonl", cache, cfg, progress=False)
    assert summary["processed"] == TINY_STUDIES, summary
    # Fill the text store once (pooled, tokens, sentences) so that runs never load the text encoder.
    index = StudyCache(cache).index()
    reports = [report_text(row, "both") for row in index]
    load_text_features(reports, TextConfig(), cache / "text", tokens=True, sentences=True, progress=False)
    return TinyCache(data=data, cache=cache, num_studies=TINY_STUDIES)
