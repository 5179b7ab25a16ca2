"""The transfer benchmark's markdown report: result tables with intervals, comparisons, the pre-training
precondition, the text diagnostic and retrieval, and the run's configuration.

    summary = transfer_results.summarise(...)      # cells and comparisons
    (out / "transfer.md").write_text(render(summary, pretrain_results))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from t3d.evaluate.gate import NOT_SENSITIVE, gate_table
from transfer_claims import alignment_table, claims_table
from transfer_results import AUROC_METRICS, SEG_METRICS, ZS_METRIC
from transfer_retrieval import retrieval_control_lines
from transfer_stats import dice_cell, seed_t_interval, wilcoxon_cases

# ----------------------------------------------------------------------------------------------- markdown


def fmt(entry: dict | None, digits: int = 3) -> str:
    """``0.812 [0.761, 0.858]``; ``n/a`` when missing or undefined."""
    if not entry or entry.get("mean") is None or not math.isfinite(entry["mean"]):
        return "n/a"
    lo, hi = entry.get("low"), entry.get("high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def metric_names(metrics: Sequence[str]) -> dict[str, str]:
    names = {**SEG_METRICS, **AUROC_METRICS, **ZS_METRIC}
    return {m: names[m] for m in metrics}


def results_table(
    cells: dict, methods: Sequence[str], metrics: Sequence[str], controls: Sequence[str] = ()
) -> list[str]:
    """One markdown table: a row per method, a column per metric (mean [95 % CI]), seeds used; the ``controls``
    first, under their own heading row, then the methods."""
    names = metric_names(metrics)
    lines = ["| method | seeds | " + " | ".join(names.values()) + " |", "|---" * (len(names) + 2) + "|"]
    blank = " |" * len(names)
    groups = [
        ("*controls*", [m for m in methods if m in controls]),
        ("*methods*", [m for m in methods if m not in controls]),
    ]
    for heading, group in groups:
        rows = [m for m in group if cells.get(m)]
        if controls and rows:
            lines.append(f"| {heading} | |{blank}")
        for m in rows:
            row = cells[m]
            seeds = max((v.get("n_seeds", 0) for v in row.values()), default=0)
            runs = max((v.get("n_runs", 0) for v in row.values()), default=0)
            used = f"{seeds} (Dice: {runs} runs)" if runs > seeds else str(seeds)
            label = f"{m} (control)" if m in controls else m
            lines.append(f"| {label} | {used} | " + " | ".join(fmt(row.get(k)) for k in names) + " |")
    return lines


def runs_table(cells: dict, methods: Sequence[str], controls: Sequence[str] = ()) -> list[str]:
    """Each segmentation fine-tuning run's mean Dice (seed-major: seed 0 run 0, run 1, ...), where any method has
    more than one run per seed: how far fine-tuning luck alone moves a cell."""
    metrics = [k for k in SEG_METRICS if any(k in cells.get(m, {}) for m in methods)]
    multi = [m for m in methods if any(cells.get(m, {}).get(k, {}).get("n_runs", 0) > 1 for k in metrics)]
    if not multi:
        return []
    lines = ["| method | " + " | ".join(f"{SEG_METRICS[k]} per run" for k in metrics) + " | largest run spread |"]
    lines.append("|---" * (len(metrics) + 2) + "|")
    for m in multi:
        row, spread = [], 0.0
        for k in metrics:
            vals = [v for v in cells[m].get(k, {}).get("run_means", []) if v is not None and math.isfinite(v)]
            row.append(", ".join(f"{v:.3f}" for v in vals) or "—")
            spread = max(spread, max(vals) - min(vals)) if vals else spread
        label = f"{m} (control)" if m in controls else m
        lines.append(f"| {label} | " + " | ".join(row) + f" | {spread:.3f} |")
    return lines


def gate_name(metric: str, fraction: float, full: float) -> str:
    """The gate entry that licenses a comparison of ``metric`` at ``fraction``."""
    return metric if fraction == full else f"{metric}_f{fraction:g}"


def probe_table(probes: dict, methods: Sequence[str], controls: Sequence[str]) -> list[str]:
    """Frozen-encoder probes per method and seed: study-probe macro AUROC and lesion-probe AUROC per size stratum."""
    columns = sorted({k for seeds in probes.values() for row in seeds.values() for k in row})
    lines = ["| method | seed | " + " | ".join(f"`{c}`" for c in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for m in [*[m for m in methods if m in controls], *[m for m in methods if m not in controls]]:
        for seed, row in sorted(probes.get(m, {}).items()):
            cells = [fmt({"mean": row[c]["value"], **row[c]}) if c in row else "n/a" for c in columns]
            label = f"{m} (control)" if m in controls else m
            lines.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
    for m in sorted(set(probes) - set(methods)):  # non-learned controls (voxel statistics of the lesion crops)
        for seed, row in sorted(probes[m].items()):
            cells = [fmt({"mean": row[c]["value"], **row[c]}) if c in row else "n/a" for c in columns]
            lines.append(f"| {m} (non-learned control) | {seed} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(comparisons: Sequence[dict]) -> list[str]:
    names = metric_names([*SEG_METRICS, *AUROC_METRICS])
    lines = [
        "| fraction | metric | A vs B | A | B | delta A-B [95 % CI] | p (paired bootstrap) | Wilcoxon p (cases, n) | "
        "verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        w = c.get("wilcoxon")
        wil = f"{_num(w['p'])} ({w['n']})" if w else "n/a (per-seed AUROC)"
        lines.append(
            f"| {c['fraction']:g} | {names.get(c['metric'], c['metric'])} | {c['a']} vs {c['b']} ({c['role']}) | "
            f"{_num(c['a_mean'])} | {_num(c['b_mean'])} | {fmt(c)} | "
            f"{_num(c['p_boot'])} | {wil} | {c['verdict']} |"
        )
    return lines


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


PRECONDITION_SHARE = 0.10
"""L_align counts as learning when it has covered this share of the way from chance (log B) to its floor."""


def align_floor(self_prob: float | None, batch: int) -> float:
    """Lowest reachable cross-entropy against targets Y whose rows put ``self_prob`` on the diagonal: the entropy of a
    row with the rest spread evenly (0 for hard targets). An upper bound of the true floor (uneven rows have less
    entropy), so the share of the way is, if anything, overstated."""
    p = 1.0 if self_prob is None else min(max(float(self_prob), 1e-9), 1.0)
    if p >= 1.0 - 1e-9 or batch < 2:
        return 0.0
    q = (1.0 - p) / (batch - 1)
    return -p * math.log(p) - (1.0 - p) * math.log(q)


def run_floor(final: dict, batch: int) -> float:
    """The floor of a run's L_align: its logged mean row entropy H(Y) (``target_entropy``, exact), else the bound of
    ``align_floor`` from the logged self-probability (logs written before H(Y) was logged)."""
    if final.get("target_entropy") is not None:
        return float(final["target_entropy"])
    return align_floor(final.get("target_self_prob"), batch)


def align_progress(final: float, log_b: float, floor: float) -> float:
    """Share of the way from log B (chance) down to ``floor`` (negative when above chance)."""
    return (log_b - final) / max(log_b - floor, 1e-9)


def align_share(run: dict) -> float | None:
    """A pre-training run's share of the way from log B to its floor (None without L_align)."""
    fin = run.get("final", {})
    if "align" not in fin:
        return None
    return align_progress(fin["align"], run["log_b"], run_floor(fin, run["batch"]))


def precondition_table(pretrain: Sequence[dict]) -> list[str]:
    """Final alignment (and view) loss per pre-training run against log B (the precondition of docs/method.md §7):
    met when the final L_align has covered at least ``PRECONDITION_SHARE`` of the way from log B to its floor."""
    lines = [
        "| method | seed | steps | B | log B | floor | final align | min align | share of the way to the floor | "
        "precondition met | final view | final restore | Y self-prob |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(pretrain, key=lambda r: (r["method"], r["seed"])):
        fin, curve = r.get("final", {}), r.get("curve", [])
        aligns = [p["align"] for p in curve if p.get("align") is not None]
        floor = run_floor(fin, r["batch"])
        share = align_share(r)
        met = "n/a" if share is None else ("**yes**" if share >= PRECONDITION_SHARE else "no")
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['steps']} | {r['batch']} | {r['log_b']:.3f} | {floor:.3f} | "
            f"{_num(fin.get('align'))} | {_num(min(aligns) if aligns else None)} | "
            f"{'n/a' if share is None else f'{100 * share:.0f} %'} | {met} | "
            f"{_num(fin.get('view'))} | {_num(fin.get('restore'), 4)} | {_num(fin.get('target_self_prob'), 2)} |"
        )
    return lines


def precondition_summary(pretrain: Sequence[dict]) -> list[str]:
    """One line per aligning method: in how many runs L_align met the precondition."""
    lines = []
    for method in sorted({r["method"] for r in pretrain if "align" in r.get("final", {})}):
        runs = [r for r in pretrain if r["method"] == method]
        shares = [align_share(r) for r in runs]
        met = sum(x >= PRECONDITION_SHARE for x in shares)
        lines.append(
            f"- {method}: precondition met in {met} of {len(runs)} runs "
            f"(share of the way to the floor {', '.join(f'{100 * x:.0f} %' for x in shares)})"
        )
    return [*lines, ""] if lines else []


def textdiag_table(diags: Sequence[dict], retrieval: dict) -> list[str]:
    """Restoration L1 with the true vs a shuffled report per run, and retrieval R@5 vs chance."""
    lines = [
        "| method | seed | conditioning | L1 true report | L1 shuffled report | shuffled - true [95 % CI] | "
        "Wilcoxon p (n) | R@5 image->report | R@5 report->image | chance R@5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in sorted(diags, key=lambda r: (r["method"], r["seed"])):
        true, shuf = np.asarray(d["true"], float), np.asarray(d["shuffled"], float)
        delta = dice_cell((shuf - true)[None], None, 2000, 0)
        w = wilcoxon_cases(shuf[None], true[None])
        ret = retrieval.get((d["method"], d["seed"])) or {}
        r5 = [ret.get(k, {}).get("R@5", {}).get("value") for k in ("image_to_report", "report_to_image")]
        lines.append(
            f"| {d['method']} | {d['seed']} | {d['conditioning']} | {true.mean():.4f} | {shuf.mean():.4f} | "
            f"{fmt(delta, 4)} | {_num(w['p'])} ({w['n']}) | {_num(r5[0])} | {_num(r5[1])} | "
            f"{_num(ret.get('chance', {}).get('R@5'))} |"
        )
    return lines


def retrieval_table(retrieval: dict) -> list[str]:
    """R@1/5/10 image->report per joint-space method: mean over seeds with a t-interval across seeds."""
    lines = ["| method | seeds | R@1 i->r | R@5 i->r | R@10 i->r | R@5 r->i | chance R@5 |", "|---" * 7 + "|"]
    for method in sorted({m for m, _ in retrieval}):
        runs = [v for (m, _), v in retrieval.items() if m == method]

        def col(direction, k, runs=runs):
            return fmt(seed_t_interval([r[direction][k]["value"] for r in runs]))

        lines.append(
            f"| {method} | {len(runs)} | {col('image_to_report', 'R@1')} | {col('image_to_report', 'R@5')} | "
            f"{col('image_to_report', 'R@10')} | {col('report_to_image', 'R@5')} | {runs[0]['chance']['R@5']:.3f} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------- document

CI_NOTE = (
    "Intervals: mean and 95 % two-level percentile bootstrap ({n_boot} replicates): seeds resampled with "
    "replacement and held-out test cases resampled with replacement (the same case draw for every seed), so both "
    "seed-to-seed and test-set variation are in the interval; with one seed it is the bootstrap over test cases. "
    "Dice cells are means over (seed, case) of the case's mean Dice over the organ or lesion classes present in it; "
    "small-lesion Dice is lesion-level (components < small_lesion_mm). AUROC cells are the mean over seeds of the "
    "macro AUROC over findings with both label values among the test studies. Paired comparisons draw the same "
    "seeds (paired by seed number) and cases for both methods; p (paired bootstrap) = 2 min(P(d*<=0), P(d*>=0)); "
    "the Wilcoxon signed-rank test is over test cases on run-averaged per-case Dice. With several segmentation "
    "fine-tuning runs per seed (`seg_repeats`), Dice intervals resample the runs within each drawn seed as well, "
    "and comparisons pair run r of one method with run r of the other (the same fine-tuning seed)."
)


def config_lines(s: dict) -> list[str]:
    """The configuration summary: data, pre-training, downstream, methods and seeds."""
    cfg, pre, data = s["config"], s["pretrain_config"], s.get("dataset") or {}
    seg, cls, tr_ = cfg["seg"], cfg["cls"], pre["train"]
    lines = []
    if data:
        lines.append(
            f"- data: synthetic, {data.get('num_studies')} studies, preset {data.get('preset')} "
            f"{data.get('shape')} voxels at {data.get('spacing')} mm; splits {data.get('splits')}; "
            f"{data.get('focal_lesions')} focal lesions, {data.get('small_lesions')} of them small"
        )
    else:
        d = cfg["data"]
        lines.append(f"- data: pre-training `{d['pretrain_manifest']}`, segmentation `{d['seg_dataset']}`, "
                     f"classification `{d['cls_labels']}`")  # fmt: skip
    lines += [
        f"- pre-training: encoder {pre['model']['encoder']}/{pre['model']['preset']}, crops {pre['crops']['size']} "
        f"x {pre['crops']['sites']} site(s) x 2 views, batch {tr_['batch_size']}, {tr_['steps']} steps, lr "
        f"{tr_['lr']}, clip grid {pre['clip']['grid']}, text {pre['text']['model']}",
        f"- segmentation: {seg.get('steps', '?')} steps, batch {seg.get('batch_size', '?')}, patch "
        f"{seg.get('crop_size') or pre['crops']['size']}, lr {seg.get('lr', '?')}, test studies capped at "
        f"{cfg['data']['seg_max_test'] or 'all'}; classification: linear probe ({cls.get('steps', '?')} L-BFGS "
        f"iterations per L2 strength)" + (", plus full fine-tune" if cfg.get("cls_finetune") is not None else ""),
        f"- label fractions {cfg['fractions']}; seeds {cfg['seeds']} (ablations {cfg['ablation_seeds']}); "
        f"segmentation runs per seed {cfg.get('seg_repeats', 1)}; methods "
        f"{', '.join(cfg['main_methods'])}; controls {', '.join(cfg.get('controls', []))}; ablations "
        f"{', '.join(cfg['ablations'])}",
    ]
    return lines


def claim_lines(comparisons: Sequence[dict], gate: dict | None = None, full: float = 1.0) -> list[str]:
    """docs/method.md §7 in plain words, one line per comparison; with a ``gate``, comparisons on metrics that did
    not pass it are marked and left out of the claim."""
    if gate is not None:
        usable = [c for c in comparisons if gate.get(gate_name(c["metric"], c["fraction"], full), {}).get("sensitive")]
        dropped = [c for c in comparisons if c not in usable]
        out = [
            f"- fraction {c['fraction']:g}, {c['metric']}: {NOT_SENSITIVE} (not used for the claim)" for c in dropped
        ]
        return out + (claim_lines(usable) if usable else ["- no comparison on a sensitive metric: no claim"])
    if not comparisons:
        return ["- no comparison possible yet (t3d and a baseline need finished runs on the same seeds)"]
    names = metric_names([*SEG_METRICS, *AUROC_METRICS])
    out = []
    for c in comparisons:
        out.append(
            f"- fraction {c['fraction']:g}, {names.get(c['metric'], c['metric'])}: {c['a']} vs {c['b']} "
            f"({c['role']}): delta {fmt(c)} -> {c['verdict']}"
        )
    holds = all(c["verdict"].startswith("A better") for c in comparisons)
    out.append(
        f"- **claim {'holds' if holds else 'does not hold'} in these results** "
        "(it needs t3d better with the interval above 0 in every comparison)"
    )
    return out


def render(s: dict, pretrain: Sequence[dict]) -> str:
    """The whole ``transfer.md``."""
    minutes = {k: v["total"] / 60 for k, v in s["stage_seconds"].items()}
    lines = [
        f"# Transfer benchmark ({s['name']})",
        "",
        f"- command: `{s['command']}` (started {s.get('run_started') or 'n/a'})"
        + (f"; this report rendered by `{s['rendered_by']}`" if s.get("rendered_by") != s["command"] else ""),
        f"- git revision: `{s['git_revision']}`"
        + (
            f" (the run started at `{s['run_revision']}`)"
            if s.get("run_revision") and s["run_revision"] != s["git_revision"]
            else ""
        )
        + (
            "; stages computed at " + ", ".join(f"`{r}` ({n})" for r, n in s["stage_revisions"].items())
            if s.get("stage_revisions")
            else ""
        ),
        f"- wall time: this invocation {s['invocation_seconds'] / 60:.1f} min; stage compute recorded in the work "
        f"folder {sum(minutes.values()):.1f} min ("
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(minutes.items()))
        + f"); report written {s['finished_at']}",
        *config_lines(s),
        "",
        *gate_lines(s),
        CI_NOTE.format(n_boot=s["config"]["n_boot"]),
        "",
        *alignment_lines(s),
        "## Precondition: does L_align fall below log B?",
        "",
        *precondition_table(pretrain),
        "",
        *precondition_summary(pretrain),
        "Final = mean of the last logged window. Chance is log B for hard and soft targets alike; the loss cannot "
        "fall below the entropy of Y's rows (floor: 0 for hard targets; for soft targets (t3d, t3d-uncond) the entropy "
        "of a row with the mean self-probability on the diagonal and the rest spread evenly, an upper bound). The "
        f"precondition is met when the final L_align has covered at least {100 * PRECONDITION_SHARE:.0f} % of the way "
        "from log B to the floor (Y self-prob: mean diagonal of Y; 1 = hard targets).",
        "",
        f"Curves: `{s['name_align_png']}`.",
    ]
    for f, cells in s["cells"].items():
        table = results_table(cells, s["methods"], s["metrics"], s.get("controls", ()))
        lines += ["", f"## Results at label fraction {f}", "", *table]
        runs = runs_table(cells, s["methods"], s.get("controls", ()))
        if runs:
            lines += ["", "Segmentation fine-tuning runs (mean Dice of each run; the intervals above include them):"]
            lines += ["", *runs]
    if s.get("probes"):
        lines += ["", "## Frozen-encoder probes (test studies; 95 % bootstrap interval over studies)", ""]
        lines += probe_table(s["probes"], s["methods"], s.get("controls", ()))
    if s.get("frozen_seg"):
        lines += ["", "## Frozen-encoder segmentation probe (decoder only, 100 % labels)", ""]
        lines += results_table(s["frozen_seg"], s["methods"], list(SEG_METRICS), s.get("controls", ()))
    lines += ["", "Zero-shot AUROC does not depend on the label fraction (same value in every table).", ""]
    lines += ["## Paired comparisons (docs/method.md §7)", "", *comparison_table(s["comparisons"]), ""]
    full = max(float(f) for f in s["cells"]) if s["cells"] else 1.0
    lines += [*claim_lines(s["comparisons"], s.get("gate"), full), ""]
    if s.get("claims") is not None:
        lines += ["## The claims (docs/method.md §7; `claims` in the JSON)", "", *claims_table(s["claims"]), ""]
    retrieval = {(r["method"], r["seed"]): r for r in s["retrieval"]}
    lines += ["## Joint space: image-report retrieval on held-out studies", ""]
    lines += [*retrieval_table(retrieval), "", "(mean over seeds, Student-t 95 % interval across seeds)", ""]
    lines += ["## Does the text matter? Restoration with the true vs a shuffled report", ""]
    lines += [
        "Masked-voxel L1 of restoring held-out crops, same crops and masks, conditioned on the study's own report or "
        "on another held-out study's report (a fixed derangement). A decoder that uses the report restores worse "
        "with the wrong one (shuffled - true > 0); the unconditioned t3d-uncond is the control (exactly 0). Interval: "
        "bootstrap over held-out studies; Wilcoxon signed-rank over studies.",
        "",
        *textdiag_table(s["textdiag"], retrieval),
    ]
    lines += ["", f"Figures: `{s['name_png']}` (bars with 95 % intervals), `{s['name_align_png']}`.", ""]
    return "\n".join(lines)


def gate_lines(s: dict) -> list[str]:
    """The sensitivity gate: the report's first table."""
    if not s.get("gate"):
        return []
    return [
        "## Sensitivity gate: can this budget tell a trained encoder from an untrained one?",
        "",
        *gate_table(s["gate"]),
        "",
        "Upper controls: supervised = the same encoder pre-trained on the ground-truth findings; supervised-seg = "
        "the same encoder trained to segment the pre-training studies' label maps (organs and lesions). random = no "
        "pre-training (lower control). A metric is *sensitive* when an upper control minus random is at least 0.15 "
        f"(AUROC) or 0.10 (Dice) with a 95 % interval excluding 0; greyed metrics are {NOT_SENSITIVE} and are not "
        "used for claims. Intervals: paired bootstrap over seeds and test cases (studies; lesion crops for the lesion "
        "probe).",
        "",
        *[f"supervised-seg (seed {r['seed']}, {r['n_train']} training studies), its own test Dice per class: "
          + ", ".join(f"{k} {'—' if v is None else f'{v:.2f}'}" for k, v in r["dice_per_class"].items()) + "\n"
          for r in s.get("seg_control") or []],
    ]  # fmt: skip


def alignment_lines(s: dict) -> list[str]:
    """The alignment gates of every joint-space run (``alignment_gates`` in the JSON) and the retrieval gate's controls
    (``retrieval_controls``)."""
    controls = retrieval_control_lines(s.get("retrieval_controls") or {})
    if not s.get("alignment_gates"):
        return ["## Retrieval through the frozen encoders (no joint-space run)", "", *controls] if controls else []
    return [
        "## Alignment gates: does the text-informed term learn? (held-out studies, per run)",
        "",
        *alignment_table(s["alignment_gates"]),
        "",
        "Gates: L_align covers at least 30 % of the way from log B to its floor H(Y); image -> report R@5 interval "
        "above chance (5 / N); mean pairwise cosine of held-out study embeddings below 0.9; restoring hidden lesion "
        "voxels worse with a shuffled report than with the study's own (interval above 0; restoration methods only). "
        "Same-findings R@5: the share of images whose 5 best reports include one with the image's own finding set. "
        "Why the text diagnostic is what it is (not gates): how far another report moves the restored image (mean "
        "|difference| per hidden voxel), and shuffled - true over focal lesions hidden entirely, where the image shows "
        "nothing of them (docs/method.md §7; '—': not measured: no restoration decoder, or a stage from before these "
        "fields).",
        "",
        *controls,
    ]
