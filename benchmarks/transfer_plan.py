"""The stages of one transfer-benchmark configuration, and its report.

    plan = Plan(cfg, work=Path("benchmarks/work/transfer_cpu"), command="...", revision="abc123")
    stages = plan.stages()        # data, prepare, then per seed round: per method pretrain -> seg -> probe -> ...
    plan.report()                 # <output>.md / .json / .png / _align.png from the finished stages

Folder layout under ``work``: ``data/`` (synthetic dataset), ``prep/`` (derived files), ``caches/{pretrain,seg,cls,
heldout}`` (preprocessed studies, the same for every method), and ``<method>/seed<k>/{pretrain, probes, seg_f<fraction>,
frozen_seg, probe_f<fraction>, finetune_f<fraction>, zeroshot, retrieval, textdiag}``; ``probe_data/`` (the labelled
studies of the frozen-encoder probes) and ``caches/probe``. The controls run first in every seed round.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from alignment_gates import measure as measure_alignment
from t3d.config import PretrainConfig, load_config, to_dict
from t3d.data.cache import StudyCache, write_json_atomic
from t3d.data.cases import prepare_cache as prepare_seg_cache
from t3d.data.labels import prepare_label_cache, read_labels
from t3d.data.preprocess import preprocess_manifest
from t3d.data.synthetic import generate_dataset
from t3d.evaluate.request import StudyRequest
from t3d.evaluate.studies import prepare_cache as prepare_study_cache
from t3d.evaluate.studies import read_split
from t3d.finetune.config import ClsConfig, SegConfig
from t3d.finetune.segdata import read_msd
from transfer_claims import alignment_gates, claims
from transfer_config import (
    REPEAT_SEED_STRIDE,
    RESULT,
    Stage,
    TransferConfig,
    flatten,
    has_joint_space,
    probe_stage_settings,
)
from transfer_controls import SEG_CONTROL, seg_control_config
from transfer_figures import plot_align, plot_cells
from transfer_probes import frozen_seg_cells, prepare_probe_data, probe_cells, run_probe_stage, sensitivity_gate
from transfer_report import render
from transfer_results import SEG_METRICS, Results, summarise
from transfer_retrieval import retrieval_controls, run_retrieval_probe_stage
from transfer_stages import (
    run_cls_stage,
    run_pretrain_stage,
    run_retrieval_stage,
    run_seg_stage,
    run_zeroshot_stage,
    text_diagnostic,
)

ROOT = Path(__file__).resolve().parents[1]


def resolve(path: str | Path) -> Path:
    """Repository-relative unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


class Plan:
    """Stages and paths of one configuration (``work``: its work folder)."""

    def __init__(self, cfg: TransferConfig, work: Path, command: str = "", revision: str = ""):
        self.cfg, self.work, self.command, self.revision = cfg, Path(work), command, revision
        self.started = time.perf_counter()
        self.output = resolve(cfg.output)
        d, syn = cfg.data, cfg.data.synthetic
        self.data = self.work / "data" if syn is not None else None

        def pick(value: str, synthetic_name: str) -> str:
            if value:
                return str(resolve(value))
            if self.data is None:
                return ""
            return str(self.data / synthetic_name) if synthetic_name else ""

        self.pretrain_manifest = pick(d.pretrain_manifest, "pretrain.jsonl")
        self.splits = pick(d.splits, "splits.json")
        self.seg_source = pick(d.seg_dataset, "dataset.json")
        self.seg_dataset = str(self.work / "prep" / "seg_dataset.json") if d.seg_max_test else self.seg_source
        self.cls_labels = pick(d.cls_labels, "findings.csv")
        self.heldout_manifest = pick(d.heldout_manifest, "reports.jsonl")
        self.pretrain_root = str(resolve(d.pretrain_root)) if d.pretrain_root else None
        self.heldout_root = str(resolve(d.heldout_root)) if d.heldout_root else None
        self.cls_images = str(resolve(d.cls_images)) if d.cls_images else ""
        self.pretrain_findings = pick(d.pretrain_findings, "ground_truth.jsonl")
        caches = ("pretrain", "seg", "cls", "heldout", "probe", "seg_control")
        self.caches = {k: self.work / "caches" / k for k in caches}
        p = cfg.probes.data
        self.probe_data = self.work / "probe_data"
        self.probe_findings = (
            str(resolve(p.findings))
            if p.findings
            else str(self.probe_data / "ground_truth.jsonl")
            if p.num_studies
            else ""
        )
        if not all((self.pretrain_manifest, self.seg_source, self.cls_labels, self.heldout_manifest)):
            raise ValueError(
                "data.synthetic is null, so data.pretrain_manifest, data.seg_dataset, data.cls_labels and "
                "data.heldout_manifest must all be set (see benchmarks/transfer_gpu.yaml)"
            )

    # ------------------------------------------------------------------------------------------- configs

    def pretrain_config(self, method: str, seed: int) -> PretrainConfig:
        fixed = {
            "method": method,
            "seed": seed,
            "data": {"manifest": self.pretrain_manifest, "cache": str(self.caches["pretrain"])},
            "train": {"out": str(self.run_dir(method, seed) / "pretrain")},
        }
        if self.pretrain_root:
            fixed["data"]["root"] = self.pretrain_root
        if self.splits and self.cfg.data.pretrain_split:
            fixed["data"].update(split_file=self.splits, split=self.cfg.data.pretrain_split)
        if method == "supervised":
            fixed["data"]["findings"] = self.pretrain_findings
        overrides = flatten(self.cfg.pretrain) + flatten(self.cfg.method_pretrain.get(method, {})) + flatten(fixed)
        return load_config(PretrainConfig, resolve(self.cfg.pretrain_config), overrides)

    def downstream_config(self, cls, fields: dict, method: str, seed: int, **run):
        """SegConfig / ClsConfig: ``fields`` of the benchmark config, the run's paths, and for ``random`` the
        architecture, preprocessing, windows and crop size of the pre-training config (no weights)."""
        cfg = replace(load_config(cls, None, flatten(fields)), seed=seed + self.cfg.finetune_seed_offset, **run)
        if method != "random":
            return replace(cfg, init=str(self.run_dir(method, seed) / "pretrain"))
        base = self.pretrain_config("t3d", seed)
        arch = {"model": base.model, "preprocess": base.preprocess, "windows": base.crops.windows}
        return replace(cfg, init="random", crop_size=cfg.crop_size or base.crops.size, **arch)

    def run_dir(self, method: str, seed: int) -> Path:
        return self.work / method / f"seed{seed}"

    # ------------------------------------------------------------------------------------------- stages

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        out: list[Stage] = []
        if self.data is not None:
            out.append(Stage("data", self.data, self._make_data, {"kind": "data"}))
        out.append(Stage("prepare", self.work / "prep", self._prepare, {"kind": "prepare"}, ("data",)))
        out.append(Stage("probe_data", self.probe_data, self._probe_data, {"kind": "probe_data"}))
        for seed in sorted(set(cfg.seeds) | set(cfg.ablation_seeds)):
            methods = [m for m in [*cfg.controls, *cfg.main_methods] if seed in cfg.seeds]
            methods += [m for m in cfg.ablations if seed in cfg.ablation_seeds]
            for method in methods:
                out += self.method_stages(method, seed)
            out.append(Stage(f"seed{seed}/report", self.work, self.report, cached=False))
        return out

    def method_stages(self, method: str, seed: int) -> list[Stage]:
        cfg, run = self.cfg, self.run_dir(method, seed)
        base = {"method": method, "seed": seed, "finetune_seed": seed + cfg.finetune_seed_offset}
        pre = f"seed{seed}/{method}/pretrain"
        needs = ("prepare",) if method == "random" else ("prepare", pre)
        out = []
        if method == SEG_CONTROL:
            meta = {"kind": "seg_control", **base}
            out.append(
                Stage(pre, run / "pretrain", lambda: run_seg_stage(seg_control_config(self, seed)), meta, ("prepare",))
            )
        elif method != "random":
            pcfg = self.pretrain_config(method, seed)
            out.append(Stage(pre, run / "pretrain", lambda: run_pretrain_stage(pcfg), {"kind": "pretrain", **base}))
        out.append(self._probe_stage(method, seed, base, needs))
        for f in cfg.fractions:
            meta = {**base, "fraction": f}
            out.append(self._seg_stage(method, seed, f, meta, needs))
            for r in range(1, cfg.seg_repeats):
                out.append(self._seg_stage(method, seed, f, meta, needs, repeat=r))
            out.append(self._cls_stage(method, seed, f, "probe", {**cfg.cls, "freeze_encoder": True}, meta, needs))
            if cfg.cls_finetune is not None:
                fields = {**cfg.cls_finetune, "freeze_encoder": False}
                out.append(self._cls_stage(method, seed, f, "finetune", fields, meta, needs))
        if cfg.frozen_seg is not None:
            meta = {**base, "fraction": max(cfg.fractions)}
            fields = {**cfg.seg, **cfg.frozen_seg, "freeze_encoder": True}
            out.append(self._seg_stage(method, seed, max(cfg.fractions), meta, needs, "frozen_seg", fields))
        if cfg.retrieval_probe is not None:
            out.append(self._retrieval_probe_stage(method, seed, base, needs))
        if has_joint_space(method):
            out += self._joint_stages(method, seed, base, needs)
        if method in cfg.diagnostic_methods and method != "random":
            out.append(
                Stage(f"seed{seed}/{method}/textdiag", run / "textdiag", lambda: self._textdiag(method, seed),
                      {"kind": "textdiag", **base}, needs)
            )  # fmt: skip
        return out

    def _seg_stage(
        self, method, seed, f, meta, needs, kind: str = "seg", fields: dict | None = None, repeat: int = 0
    ) -> Stage:
        """A segmentation stage; ``repeat`` r > 0: the r-th extra fine-tuning run (its own seed, folder and name)."""
        run = f"_run{repeat}" if repeat else ""
        out = self.run_dir(method, seed) / ((f"seg_f{f:g}" if kind == "seg" else kind) + run)
        paths = {"data": self.seg_dataset, "out": str(out), "cache": str(self.caches["seg"]), "fraction": f}
        scfg = self.downstream_config(SegConfig, self.cfg.seg if fields is None else fields, method, seed, **paths)
        if repeat:
            scfg = replace(scfg, seed=scfg.seed + REPEAT_SEED_STRIDE * repeat)
            meta = {**meta, "repeat": repeat, "finetune_seed": scfg.seed}
        name = f"seed{seed}/{method}/{kind} f={f:g}" + (f" run{repeat}" if repeat else "")
        return Stage(name, out, lambda: run_seg_stage(scfg), {"kind": kind, **meta}, needs)

    def _probe_stage(self, method, seed, base, needs) -> Stage:
        out = self.run_dir(method, seed) / "probes"
        ckpt = None if method == "random" else self.run_dir(method, seed) / "pretrain"
        pcfg = self.pretrain_config("t3d", seed)  # architecture, crop size and windows of the random control

        def run() -> dict:
            s = self.cfg.probes
            return run_probe_stage(ckpt, pcfg, s, self.caches["probe"], self.probe_findings, out, seed)

        settings = probe_stage_settings(self.cfg.probes)
        meta = {"kind": "probes", **base, "settings": settings}
        return Stage(f"seed{seed}/{method}/probes", out, run, meta, (*needs, "probe_data"))

    def _retrieval_probe_stage(self, method, seed, base, needs) -> Stage:
        out, e = self.run_dir(method, seed) / "retrieval_probe", self.cfg.evaluate
        ckpt = None if method == "random" else self.run_dir(method, seed) / "pretrain"
        pcfg = self.pretrain_config("t3d", seed)  # the random control's encoder; every method's text encoder

        def run() -> dict:
            cache = self.caches["heldout"]
            prepare_study_cache(self.heldout_manifest, cache, pcfg.preprocess, root=self.heldout_root,
                                workers=self.cfg.preprocess_workers)  # fmt: skip
            train_ids = test_ids = None
            if self.splits:
                train_ids = read_split(self.splits, self.cfg.data.pretrain_split)
                test_ids = [i for s in self.cfg.alignment_splits for i in read_split(self.splits, s)]
            truth = self.data / "ground_truth.jsonl" if self.data is not None else None
            train, test = (self.caches["pretrain"], train_ids), (cache, test_ids)
            return run_retrieval_probe_stage(ckpt, pcfg, self.cfg.retrieval_probe, train, test, truth, seed,
                                             max_crops=e.max_crops, overlap=e.overlap,
                                             with_ceiling=method == "random")  # fmt: skip

        meta = {"kind": "retrieval_probe", **base, "settings": to_dict(self.cfg.retrieval_probe)}
        return Stage(f"seed{seed}/{method}/retrieval_probe", out, run, meta, needs)

    def _probe_data(self) -> dict:
        pre, workers = self.pretrain_config("t3d", 0).preprocess, self.cfg.preprocess_workers
        return prepare_probe_data(self.cfg.probes, self.probe_data, self.caches["probe"], pre, workers)

    def _cls_stage(self, method, seed, f, kind, fields, meta, needs) -> Stage:
        out = self.run_dir(method, seed) / f"{kind}_f{f:g}"
        paths = {"data": self.cls_labels, "images": self.cls_images, "out": str(out), "fraction": f}
        paths.update(cache=str(self.caches["cls"]), splits=self.splits, test_split=self.cfg.data.test_split)
        ccfg = self.downstream_config(ClsConfig, fields, method, seed, **paths)
        name = f"seed{seed}/{method}/{kind} f={f:g}"
        return Stage(name, out, lambda: run_cls_stage(ccfg), {"kind": kind, **meta}, needs)

    def study_request(self, method: str, seed: int, task: str, cache: str) -> StudyRequest:
        """The request of a joint-space evaluation (``zeroshot`` / ``retrieval``) of one pre-training run."""
        e, run = self.cfg.evaluate, self.run_dir(method, seed)
        return StudyRequest(
            checkpoint=str(run / "pretrain"), out=str(run / task), cache=str(self.caches[cache]), splits=self.splits,
            split=self.cfg.data.test_split, max_crops=e.max_crops, overlap=e.overlap, crop_batch=e.crop_batch,
            workers=e.workers,
        )  # fmt: skip

    def _joint_stages(self, method, seed, base, needs) -> list[Stage]:
        run, n_boot = self.run_dir(method, seed), self.cfg.evaluate.n_boot
        zs, ret = (
            self.study_request(method, seed, "zeroshot", "cls"),
            self.study_request(method, seed, "retrieval", "heldout"),
        )
        return [
            Stage(f"seed{seed}/{method}/zeroshot", run / "zeroshot",
                  lambda: run_zeroshot_stage(zs, self.cls_labels, self.cls_images or None, n_boot, seed),
                  {"kind": "zeroshot", **base}, needs),
            Stage(f"seed{seed}/{method}/retrieval", run / "retrieval",
                  lambda: run_retrieval_stage(ret, self.heldout_manifest, self.heldout_root, n_boot, seed),
                  {"kind": "retrieval", **base}, needs),
            Stage(f"seed{seed}/{method}/alignment", run / "alignment", lambda: self._alignment(method, seed),
                  {"kind": "alignment", **base}, needs),
        ]  # fmt: skip

    def _make_data(self) -> dict:
        s = self.cfg.data.synthetic
        summary = generate_dataset(self.data, s.num_studies, s.seed, preset=s.preset, workers=s.workers)
        return {k: v for k, v in summary.items() if k != "out_dir"}

    def _prepare(self) -> dict:
        """The pre-training cache (every method reads it) and the segmentation test subset file."""
        pcfg = self.pretrain_config("t3d", 0)
        summary = preprocess_manifest(
            self.pretrain_manifest,
            self.caches["pretrain"],
            pcfg.preprocess,
            root=self.pretrain_root,
            workers=self.cfg.preprocess_workers,
        )
        result = {"pretrain_cache": {k: v for k, v in summary.items() if isinstance(v, int | float | str)}}
        if self.cfg.data.seg_max_test:
            result["seg_test"] = write_seg_subset(self.seg_source, self.seg_dataset, self.cfg.data.seg_max_test)
        return result

    def warm_caches(self) -> None:
        """Preprocess the studies every downstream stage shares (segmentation, findings, held-out reports) now, so that
        parallel workers (``--jobs``) only read these caches; a cache is written safely by one process at a time."""
        pre, workers = self.pretrain_config("t3d", 0).preprocess, self.cfg.preprocess_workers
        train, test, _ = read_msd(self.seg_dataset)
        prepare_seg_cache(train + test, self.caches["seg"], pre, workers)
        prepare_label_cache(read_labels(self.cls_labels, self.cls_images or None), self.caches["cls"], pre, workers)
        prepare_study_cache(self.heldout_manifest, self.caches["heldout"], pre, root=self.heldout_root, workers=workers)
        if SEG_CONTROL in self.cfg.controls:
            train, _, _ = read_msd(seg_control_config(self, 0).data)
            prepare_seg_cache(train, self.caches["seg_control"], pre, workers)

    def _textdiag(self, method: str, seed: int) -> dict:
        pcfg = self.pretrain_config(method, seed)
        cache = self.caches["heldout"]
        workers = self.cfg.preprocess_workers
        prepare_study_cache(self.heldout_manifest, cache, pcfg.preprocess, root=self.heldout_root, workers=workers)
        ids = read_split(self.splits, self.cfg.data.test_split) if self.splits else None
        run = self.run_dir(method, seed) / "pretrain"
        return text_diagnostic(run, cache, ids, repeats=self.cfg.diagnostic_repeats, seed=seed)

    def _alignment(self, method: str, seed: int) -> dict:
        """The alignment gates of one joint-space run on the studies of ``alignment_splits`` (never pre-trained on)."""
        pcfg, cache, e = self.pretrain_config(method, seed), self.caches["heldout"], self.cfg.evaluate
        workers = self.cfg.preprocess_workers
        prepare_study_cache(self.heldout_manifest, cache, pcfg.preprocess, root=self.heldout_root, workers=workers)
        if self.splits:
            ids = [i for split in self.cfg.alignment_splits for i in read_split(self.splits, split)]
        else:
            ids = [row["id"] for row in StudyCache(cache).index()]
        truth = self.data / "ground_truth.jsonl" if self.data is not None else None
        args = SimpleNamespace(
            window=2, repeats=max(2, self.cfg.diagnostic_repeats), max_crops=e.max_crops, n_boot=e.n_boot, seed=seed,
            ground_truth=str(truth) if truth is not None and truth.is_file() else None,
        )  # fmt: skip
        return measure_alignment(self.run_dir(method, seed) / "pretrain", cache, ids, args)

    # ------------------------------------------------------------------------------------------- report

    def finished(self) -> list[dict]:
        """``result.json`` of every finished method stage of this configuration."""
        out = []
        for stage in self.stages():
            if stage.cached and stage.meta.get("method") and stage.result_path.is_file():
                out.append(json.loads(stage.result_path.read_text()))
        return out

    def report(self) -> dict:
        results = self.finished()
        cfg = self.cfg
        methods = [*cfg.controls, *cfg.main_methods, *cfg.ablations]
        metrics = [*SEG_METRICS, "probe_auroc"] + (["finetune_auroc"] if cfg.cls_finetune is not None else [])
        metrics.append("zeroshot_auroc")
        table = Results(results, cfg.data.lesion_labels)
        summary = summarise(table, methods, cfg.fractions, cfg.vssl_methods, metrics, cfg.n_boot)
        summary.update(self.context(results), metrics=metrics, methods=methods, controls=list(cfg.controls))
        thresholds, focal, lesions = cfg.probes.size_thresholds_mm, cfg.probes.focal_findings, table.lesion_labels
        gate = summary["gate"] = sensitivity_gate(results, thresholds, cfg.fractions, cfg.n_boot, focal, lesions)
        summary["probes"] = probe_cells(results, methods, thresholds, focal, cfg.probes.n_boot)
        summary["frozen_seg"] = frozen_seg_cells(table, methods, max(cfg.fractions), cfg.n_boot)
        summary["alignment_gates"] = alignment_gates(results)
        summary["retrieval_controls"] = retrieval_controls(results)
        summary["claims"] = claims(
            results, thresholds, cfg.fractions, cfg.vssl_methods, gate, cfg.n_boot, lesions, focal
        )
        summary["revision"], summary["command"] = summary["git_revision"], summary["command"]
        summary.update(name_png=self.output.name + ".png", name_align_png=self.output.name + "_align.png")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        pretrain = [r for r in results if r["kind"] == "pretrain"]
        keep = ("method", "seed", "steps", "batch", "log_b", "final", "curve", "seconds")
        summary["pretrain"] = [{k: r[k] for k in keep if k in r} for r in pretrain]  # curve: per logged step
        keep = ("method", "seed", "dice_per_class", "dice_mean", "n_train", "seconds")
        summary["seg_control"] = [{k: r.get(k) for k in keep} for r in results if r["kind"] == "seg_control"]
        summary["textdiag"] = [r for r in results if r["kind"] == "textdiag"]
        summary["retrieval"] = [r for r in results if r["kind"] == "retrieval"]
        self.output.with_suffix(".md").write_text(render(summary, pretrain))
        write_json_atomic(self.output.with_suffix(".json"), _json_safe(summary))
        plot_cells(summary["cells"], methods, metrics, self.output.with_suffix(".png"), f"transfer: {cfg.name}")
        plot_align(pretrain, self.output.parent / f"{self.output.name}_align.png")
        return summary

    def context(self, results: list[dict]) -> dict:
        """What the report says about how it was made: command, revision, times, configuration."""
        stage_seconds: dict[str, list[float]] = {}
        for r in results:
            stage_seconds.setdefault(r["kind"], []).append(float(r.get("seconds", 0.0)))
        data = json.loads((self.data / RESULT).read_text()) if self.data and (self.data / RESULT).is_file() else {}
        pcfg = self.pretrain_config("t3d", 0)
        run = json.loads((self.work / "run.json").read_text()) if (self.work / "run.json").is_file() else {}
        return {
            "name": self.cfg.name,
            "command": run.get("command", self.command),
            "run_started": run.get("started", ""),
            "run_revision": run.get("git_revision", ""),
            "stage_revisions": Results(results).revisions(),
            "rendered_by": self.command,
            "git_revision": self.revision,
            "invocation_seconds": round(time.perf_counter() - self.started, 1),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "stage_seconds": {
                k: {"count": len(v), "total": round(sum(v), 1), "mean": round(sum(v) / len(v), 1)}
                for k, v in stage_seconds.items()
            },  # fmt: skip
            "config": to_dict(self.cfg),
            "pretrain_config": to_dict(pcfg),
            "dataset": data,
        }


def write_seg_subset(source: str, target: str, max_test: int) -> dict:
    """A copy of an MSD ``dataset.json`` whose labelled ``test`` list keeps its first ``max_test`` entries by image
    name (paths made absolute, so the copy works from anywhere)."""
    src = Path(source)
    desc = json.loads(src.read_text())

    def absolute(entry):
        if isinstance(entry, dict):
            return {k: str((src.parent / v).resolve()) if k in ("image", "label") else v for k, v in entry.items()}
        return str((src.parent / entry).resolve())

    test = sorted((e for e in desc.get("test") or [] if isinstance(e, dict)), key=lambda e: Path(e["image"]).name)
    desc["training"] = [absolute(e) for e in desc["training"]]
    desc["test"] = [absolute(e) for e in test[:max_test]]
    desc["numTest"] = len(desc["test"])
    write_json_atomic(Path(target), desc)
    return {"kept": len(desc["test"]), "of": len(test)}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
