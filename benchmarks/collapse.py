"""Collapse diagnostics of a pre-training checkpoint's joint space: is every study embedded to the same point?

    python benchmarks/collapse.py --checkpoint runs/pretrain/t3d --cache cache --splits data/synth/splits.json \\
        --out benchmarks/results/collapse.json

For the training split (``--train-split``, default ``pretrain``) and the held-out split (``--test-split``): the mean
pairwise cosine of the study embeddings (grid crops, as ``t3d evaluate`` builds them) and of the projected reports
(near 1 = collapsed), and image <-> report retrieval R@k with bootstrap intervals and chance k / N. A collapsed joint
space retrieves at chance on its *own training studies*; memorisation shows as training retrieval far above
held-out retrieval. The JSON carries the git revision and the command line.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from t3d.data.cache import write_json_atomic
from t3d.evaluate.joint import image_embeddings, load_joint, study_dataset, text_embeddings
from t3d.evaluate.retrieval import retrieval_metrics
from t3d.evaluate.studies import read_split, report_texts
from t3d.losses.objective import mean_pairwise_cosine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_revision  # noqa: E402


def split_diagnostics(jm, cache: Path, ids: list[str], n_boot: int, max_crops: int) -> dict:
    """Embedding spread and retrieval of the studies ``ids`` (those with a report)."""
    ids, texts = report_texts(cache, jm.cfg.text.sections, ids)
    u, got = image_embeddings(jm, study_dataset(jm.cfg, jm.spec, cache, ids, max_crops=max_crops))
    if got != ids:
        raise ValueError(f"{cache}: the cached studies and their reports do not line up")
    t = text_embeddings(jm, texts, cache / "text")
    return {
        "n_studies": len(ids),
        "image_mean_cosine": float(mean_pairwise_cosine(u)),
        "report_mean_cosine": float(mean_pairwise_cosine(t)),
        "retrieval": retrieval_metrics(u, t, n_boot=n_boot, reports=texts),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run folder or .pt of `t3d pretrain` (a joint-space method)")
    p.add_argument("--cache", required=True, help="`t3d preprocess` cache holding both splits' studies and reports")
    p.add_argument("--splits", required=True, help="JSON split file")
    p.add_argument("--train-split", default="pretrain")
    p.add_argument("--test-split", default="test")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--max-crops", type=int, default=27)
    p.add_argument("--out", default="benchmarks/results/collapse.json")
    args = p.parse_args(argv)
    jm = load_joint(args.checkpoint)
    jm.require_joint_space()
    cache = Path(args.cache)
    result = {
        "revision": git_revision(),
        "command": shlex.join(["python", "benchmarks/collapse.py", *argv]),
        "checkpoint": str(args.checkpoint),
        "method": jm.method,
        "step": jm.step,
    }
    for name, split in (("train", args.train_split), ("held_out", args.test_split)):
        ids = read_split(args.splits, split)
        result[name] = {"split": split, **split_diagnostics(jm, cache, ids, args.n_boot, args.max_crops)}
    write_json_atomic(Path(args.out), result)
    print(json.dumps({k: {m: v[m] for m in ("n_studies", "image_mean_cosine", "report_mean_cosine")}
                      for k, v in result.items() if isinstance(v, dict)}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
