"""The retrieval gate's own controls (docs/method.md §7): can retrieval of held-out reports see an encoder that knows
the findings at all, on these pairs?

    result = run_retrieval_probe_stage(checkpoint, pcfg, settings, (cache, ids), (cache, ids), ground_truth, seed)
    summary = retrieval_controls(stage_results, controls)   # "retrieval_controls" in transfer.json

One stage per (method, seed), the controls included: study features of the method's frozen encoder over the fixed
tile grid (``t3d.evaluate.features.study_features``), the pre-training studies' reports and the held-out studies'
(``alignment_splits``) through the frozen text encoder, and ``t3d.evaluate.retrieval_probe`` between them: linear
heads trained on the pre-training pairs, image -> report R@5 on the held-out pairs. With synthetic ground truth the
stage also fits the same heads on exact finding vectors (every finding; the diffuse ones only): what a perfect
encoder of those findings would retrieve, the ceiling of the gate at this number of pairs (it does not depend on the
encoder: the benchmark computes it in the ``random`` control's stage only). The retrieval gate of a
text-aligned run is *sensitive* when a positive control's interval clears chance; otherwise "R@5 at chance" says
nothing about the method.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignment_gates import finding_sets, same_findings_r5
from t3d.config import PretrainConfig
from t3d.data.synthetic.findings import FOCAL
from t3d.evaluate.features import frozen_encoder, study_features
from t3d.evaluate.retrieval_probe import RetrievalProbeConfig, retrieval_probe
from t3d.evaluate.studies import report_texts
from t3d.text import load_text_features

POSITIVE_CONTROLS = ("supervised", "supervised-seg")
"""Controls whose encoders were trained on the findings or the label maps: the retrieval gate's positive controls."""


def finding_vectors(sets: list[frozenset], vocab: list) -> torch.Tensor:
    """(N, len(vocab)) multi-hot rows: which (type, organ, side) findings each study has."""
    return torch.tensor([[float(v in s) for v in vocab] for s in sets])


def _summary(r: dict, sets: list[frozenset] | None) -> dict:
    u, v = r.pop("embeddings")
    if sets is not None:
        r.update(same_findings_r5(u @ v.T, sets))
    return r


def run_retrieval_probe_stage(
    checkpoint: Path | None,
    pcfg: PretrainConfig,
    settings: RetrievalProbeConfig,
    train: tuple[Path, list[str]],
    test: tuple[Path, list[str]],
    ground_truth: Path | None,
    seed: int,
    max_crops: int = 27,
    overlap: float = 0.25,
    with_ceiling: bool = True,
) -> dict:
    """Retrieval through linear heads on one encoder's frozen study features; ``train`` / ``test``: (cache, ids).
    ``with_ceiling`` (and ground truth): also the heads on exact finding vectors, the same for every encoder."""
    enc = frozen_encoder(checkpoint, pcfg, seed=seed)
    (train_cache, train_ids), (test_cache, test_ids) = train, test
    sections = pcfg.text.sections
    train_ids, train_txt = report_texts(train_cache, sections, train_ids)
    test_ids, test_txt = report_texts(test_cache, sections, test_ids)
    x_train, got_train = study_features(enc, train_cache, train_ids, overlap=overlap, max_crops=max_crops)
    x_test, got_test = study_features(enc, test_cache, test_ids, overlap=overlap, max_crops=max_crops)
    if got_train != train_ids or got_test != test_ids:
        raise ValueError(f"{train_cache} / {test_cache}: the cached studies and their reports do not line up")
    text = load_text_features(train_txt + test_txt, pcfg.text, Path(train_cache) / "text", progress=False).pooled
    t_train, t_test = text[: len(train_ids)].float(), text[len(train_ids) :].float()
    sets = None
    if ground_truth is not None and ground_truth.is_file():
        sets = finding_sets(ground_truth, test_ids)
    out = _summary(retrieval_probe(x_train, t_train, x_test, t_test, settings, seed), sets)
    out["feature_dim"] = int(x_train.shape[1])
    if sets is not None and with_ceiling:
        train_sets = finding_sets(ground_truth, train_ids)
        vocab = sorted(set().union(*train_sets, *sets), key=str)
        diffuse = [v for v in vocab if v[0] not in FOCAL]
        out["ceiling"] = {
            name: _summary(
                retrieval_probe(finding_vectors(train_sets, vs), t_train, finding_vectors(sets, vs), t_test,
                                settings, seed),
                sets,
            )
            for name, vs in (("findings", vocab), ("diffuse_findings", diffuse))
        }  # fmt: skip
    return out


def retrieval_controls(results: list[dict], controls=POSITIVE_CONTROLS) -> dict:
    """``{"runs": {method: {seed: row}}, "ceiling": {seed: {...}}, "sensitive": {seed: bool | None}}``: R@5 of
    linear heads on each encoder, and whether a positive control's interval clears chance (None: none measured)."""
    runs: dict = {}
    ceiling: dict = {}
    for r in results:
        if r.get("kind") != "retrieval_probe":
            continue
        row = {"r5": r["r@5"]["value"], "r5_ci_low": r["r@5"]["low"], "r5_ci_high": r["r@5"]["high"]}
        row.update({k: r[k] for k in ("chance", "train_r5", "weight_decay", "n_train", "n_test")})
        row.update({k: r[k] for k in ("same_findings_r5", "same_findings_r5_chance") if k in r})
        runs.setdefault(r["method"], {})[str(r["seed"])] = row
        if "ceiling" in r:
            ceiling[str(r["seed"])] = {
                name: {"r5": c["r@5"]["value"], "r5_ci_low": c["r@5"]["low"], "r5_ci_high": c["r@5"]["high"]}
                for name, c in r["ceiling"].items()
            }
    seeds = sorted({s for per in runs.values() for s in per})
    sensitive = {}
    for s in seeds:
        rows = [runs[m][s] for m in controls if s in runs.get(m, {})]
        sensitive[s] = any(row["r5_ci_low"] > row["chance"] for row in rows) if rows else None
    return {"runs": runs, "ceiling": ceiling, "sensitive": sensitive}


def retrieval_control_lines(rc: dict) -> list[str]:
    """The report's paragraph: R@5 through linear heads per encoder, the ceiling, and the verdict on the gate."""
    if not rc or not rc.get("runs"):
        return []
    lines = [
        "Retrieval through linear heads on each frozen encoder (trained on the pre-training pairs, held-out R@5 "
        "[95 % CI], chance; same-findings R@5 where known):",
        "",
        "| encoder | seed | held-out R@5 [CI] | chance | training R@5 | same-findings R@5 vs chance |",
        "|---|---|---|---|---|---|",
    ]
    for method, per in rc["runs"].items():
        for seed, r in sorted(per.items()):
            same = (
                f"{r['same_findings_r5']:.3f} vs {r['same_findings_r5_chance']:.3f}" if "same_findings_r5" in r else "—"
            )
            lines.append(
                f"| {method} | {seed} | {r['r5']:.3f} [{r['r5_ci_low']:.3f}, {r['r5_ci_high']:.3f}] | "
                f"{r['chance']:.3f} | {r['train_r5']:.2f} | {same} |"
            )
    names = {"findings": "exact finding vectors (ceiling)", "diffuse_findings": "exact diffuse findings only"}
    for seed, per in sorted(rc.get("ceiling", {}).items()):
        for key, c in per.items():
            interval = f"{c['r5']:.3f} [{c['r5_ci_low']:.3f}, {c['r5_ci_high']:.3f}]"
            lines.append(f"| {names.get(key, key)} | {seed} | {interval} | | | |")
    lines.append("")
    for seed, ok in sorted(rc["sensitive"].items()):
        verdict = (
            "no positive control was measured"
            if ok is None
            else "a positive control clears chance: the retrieval gate is sensitive"
            if ok
            else "no positive control clears chance: the retrieval gate cannot see a finding-aware encoder at this "
            "budget, so its failure is no evidence against a method"
        )
        lines.append(f"Seed {seed}: {verdict}.")
    return [*lines, ""]
