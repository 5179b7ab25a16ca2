"""The transfer benchmark's configuration (``TransferConfig`` and its YAML loader) and its unit of work (``Stage``,
``run_stages``): shared by the command line (``transfer.py``) and the planner (``transfer_plan.py``)."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from provenance import git_revision
from t3d.config import ConfigError, load_config, to_dict
from t3d.data.cache import write_json_atomic
from t3d.data.synthetic.findings import CSV_COLUMNS, FOCAL
from t3d.evaluate.features import POOLINGS
from t3d.evaluate.retrieval_probe import RetrievalProbeConfig
from t3d.losses import method_spec
from transfer_controls import SEG_CONTROL

RESULT = "result.json"


def has_joint_space(method: str) -> bool:
    """Pre-trained with image-report alignment (t3d family, clip): zero-shot and retrieval are defined (not for the
    controls, which have no text)."""
    return method not in ("random", SEG_CONTROL) and method_spec(method).align != "none"


# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class SyntheticData:
    """``t3d synth`` settings when the benchmark makes its own data."""

    num_studies: int = 80
    """Studies generated; split 60/20/20 into pretrain / finetune / test by the generator."""
    seed: int = 0
    preset: str = "small"
    workers: int = 2


@dataclass
class DataPaths:
    """Where the three datasets are. With ``synthetic`` set, empty paths point into the generated folder."""

    synthetic: SyntheticData | None = field(default_factory=SyntheticData)
    """Generate a synthetic dataset (``null`` for real data: then every path below is needed)."""
    pretrain_manifest: str = ""
    """Pre-training manifest (JSONL/CSV, CT-RATE layout read as is); synthetic: pretrain.jsonl."""
    pretrain_root: str = ""
    """Folder the manifest's images resolve against (default: the manifest's folder)."""
    splits: str = ""
    """JSON split file {"pretrain", "finetune", "test"}: pre-training reads 'pretrain' (empty: the whole manifest),
    classification trains on 'finetune' and tests on ``test_split``, held-out evaluation uses ``test_split``."""
    test_split: str = "test"
    pretrain_split: str = "pretrain"
    """Split of ``splits`` pre-training reads; empty = the whole manifest (e.g. CT-RATE's train reports)."""
    seg_dataset: str = ""
    """MSD/BTCV ``dataset.json``; synthetic: dataset.json (training = finetune split, test = test split)."""
    seg_max_test: int = 0
    """Score segmentation on at most this many of the labelled test studies (the first by id; 0 = all)."""
    lesion_labels: list[int] | None = None
    """Classes averaged as 'lesion Dice' (the rest are organs); null = names with lesion/tumour/nodule/cyst/..."""
    pretrain_findings: str = ""
    """Ground-truth findings of the pre-training studies for the ``supervised`` control (findings CSV or
    ground_truth.jsonl); synthetic: ground_truth.jsonl."""
    cls_labels: str = ""
    """Findings CSV (CT-RATE multi_abnormality_labels layout); synthetic: findings.csv."""
    cls_images: str = ""
    """Folder the CSV's VolumeName entries resolve against (default: the CSV's folder / images/)."""
    heldout_manifest: str = ""
    """Manifest with reports of the held-out studies (retrieval, text diagnostic); synthetic: reports.jsonl."""
    heldout_root: str = ""


@dataclass
class EvalSettings:
    """Zero-shot / retrieval settings (``t3d evaluate``)."""

    n_boot: int = 200
    """Bootstrap replicates inside each evaluation run (the report draws its own intervals)."""
    overlap: float = 0.25
    max_crops: int = 27
    crop_batch: int = 8
    workers: int = 0


@dataclass
class ProbeData(SyntheticData):
    """Where the labelled probe studies come from: generated (``num_studies`` > 0, the ``t3d synth`` settings of
    ``SyntheticData``) or a manifest of real ones."""

    num_studies: int = 600
    """Synthetic studies generated for the probes (0: use ``manifest``)."""
    seed: int = 1000
    """Generator seed: another seed than the pre-training data's, so no study is shared."""
    manifest: str = ""
    """Real data (``num_studies: 0``): an MSD ``dataset.json`` (e.g. Task06_Lung, Task03_Liver; its labelled
    studies) or a manifest (JSONL/CSV) with ``id``, ``image`` and ``label`` columns."""
    findings: str = ""
    """Real data: findings CSV / ground_truth.jsonl for the study probe (empty: study probe skipped)."""


@dataclass
class ProbeSettings:
    """The frozen-encoder probes: data, split, lesion classes and size strata, probe fitting."""

    data: ProbeData = field(default_factory=ProbeData)
    test_fraction: float = 0.34
    """Share of the probe studies held out as the test set (the rest: train + validation)."""
    val_fraction: float = 0.2
    """Share of the remaining studies that choose the L2 strength."""
    seed: int = 0
    """Split and lesion-site sampling: the same for every method."""
    lesion_labels: list[int] = field(default_factory=lambda: [9, 10, 11, 12])
    """Label classes whose connected components are lesions (synthetic: liver lesion, cyst, nodule, stone)."""
    focal_findings: list[str] = field(default_factory=lambda: [CSV_COLUMNS[f] for f in FOCAL])
    """Findings-CSV columns that are focal lesions (synthetic: liver lesion, renal cyst, lung nodule, kidney stone).
    Besides the macro over every finding, the study probe is scored on these (``study_probe_auroc_focal``) and on
    the others (``study_probe_auroc_diffuse``: effusion, organ size or attenuation) apart; empty: the macro only.
    A reporting choice: the probe stages do not depend on it."""
    size_thresholds_mm: list[float] = field(default_factory=lambda: [10.0])
    """Lesion-size strata edges (equivalent diameter); one edge gives ``small`` and ``large``."""
    negatives_per_lesion: int = 1
    voxel_region: list[int] = field(default_factory=lambda: [4, 4, 2])
    """Central box (voxels) whose HU statistics are the lesion probe's non-learned control (``voxel_statistics``);
    with ``lesion_pooling: centre`` also the box whose encoder cells are read."""
    lesion_probe_per_class: bool = True
    """One lesion probe per lesion class (their scores pooled per stratum), or one over every class (false). A nodule
    in the lung and a cyst in a kidney differ from their surroundings in opposite directions: one linear direction
    for both sees neither well."""
    lesion_pooling: str = "centre"
    """How the lesion probe reads a crop (``t3d.evaluate.features.crop_features``): ``centre``, every encoder
    level's cells over the central box (lesion scale), or ``crop``, the encoder's pooled feature of the whole crop."""
    l2: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0])
    steps: int = 100
    """L-BFGS iterations per L2 strength."""
    n_boot: int = 1000
    overlap: float = 0.25
    max_crops: int = 27


def probe_stage_settings(s: ProbeSettings) -> dict:
    """A probe stage's settings (JSON): every ``ProbeSettings`` field but the probe studies (the work folder's
    fingerprint) and how the report groups the findings (``focal_findings``)."""
    return json.loads(json.dumps({k: v for k, v in to_dict(s).items() if k not in ("data", "focal_findings")}))


@dataclass
class TransferConfig:
    """The benchmark: methods x seeds x label fractions, and how each stage is configured."""

    name: str = ""
    """Work folder name under ``work`` (default: the config file's stem; ``--smoke`` appends ``-smoke``)."""
    work: str = "benchmarks/work"
    output: str = "benchmarks/results/transfer"
    """Report path stem: <output>.md, .json, .png and <output>_align.png."""
    controls: list[str] = field(default_factory=lambda: ["random", "supervised"])
    """Lower (``random``: no pre-training) and upper references, run for every seed and listed apart from the
    methods: ``supervised`` (ground-truth findings) and ``supervised-seg`` (segmentation of the pre-training studies'
    label maps, ``transfer_controls``). The sensitivity gate is an upper reference minus ``random``."""
    main_methods: list[str] = field(default_factory=lambda: ["vssl", "vssl-contrastive", "vssl-restore", "clip", "t3d"])
    ablations: list[str] = field(default_factory=lambda: ["t3d-no-align", "t3d-hard", "t3d-uncond"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ablation_seeds: list[int] = field(default_factory=lambda: [0])
    fractions: list[float] = field(default_factory=lambda: [0.25, 1.0])
    vssl_methods: list[str] = field(default_factory=lambda: ["vssl", "vssl-contrastive", "vssl-restore"])
    """Candidates for 'the best vSSL baseline' (chosen per metric and fraction by its mean)."""
    diagnostic_methods: list[str] = field(default_factory=lambda: ["t3d", "t3d-uncond"])
    alignment_splits: list[str] = field(default_factory=lambda: ["finetune", "test"])
    """Splits whose studies (never pre-trained on) measure the alignment gates of every joint-space run."""
    diagnostic_repeats: int = 1
    """Draws of crop sites and masks per held-out study in the text diagnostic."""
    data: DataPaths = field(default_factory=DataPaths)
    pretrain_config: str = "configs/quickstart.yaml"
    """PretrainConfig YAML every method starts from (repository-relative)."""
    pretrain: dict = field(default_factory=dict)
    """PretrainConfig overrides (nested or dotted keys); method, seed, data paths and train.out are set per run."""
    method_pretrain: dict = field(default_factory=dict)
    """Per-method PretrainConfig overrides on top of ``pretrain`` ({method: {key: value}}), e.g. a longer budget for
    the ``supervised`` control, whose per-crop targets need more steps than a contrastive batch does."""
    seg: dict = field(default_factory=dict)
    """SegConfig fields (``t3d finetune seg``); data, init, out, cache, fraction and seed are set per run."""
    seg_control: dict = field(default_factory=lambda: {"steps": 1500})
    """SegConfig fields on top of ``seg`` for the ``supervised-seg`` control's training on the pre-training studies."""
    cls: dict = field(default_factory=dict)
    """ClsConfig fields of the linear probe (``t3d finetune cls --probe``)."""
    cls_finetune: dict | None = None
    """ClsConfig fields of a full classification fine-tune; null = probe only."""
    frozen_seg: dict | None = field(default_factory=dict)
    """SegConfig fields of the frozen-encoder segmentation probe (decoder only, 100 % labels) on top of ``seg``;
    null = not run."""
    finetune_seed_offset: int = 1000
    """Downstream runs of pre-training seed k use seed k + offset: fine-tuning luck is not pre-training luck (the
    pair is recorded in every result as ``seed`` / ``finetune_seed``)."""
    seg_repeats: int = 1
    """Segmentation fine-tuning runs per (method, pre-training seed, label fraction); run r > 0 uses fine-tuning seed
    k + offset + 100 r. Dice intervals and comparisons then resample runs within each seed too: one run's luck (which
    small organ is learnt by the last step) moves organ Dice as much as pre-training does at a small budget."""
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    retrieval_probe: RetrievalProbeConfig | None = field(default_factory=RetrievalProbeConfig)
    """Linear heads on every encoder's frozen study features, trained on the pre-training pairs and scored by
    held-out image -> report R@5 (``transfer_retrieval``): the retrieval gate's controls; null = not run."""
    n_boot: int = 2000
    """Replicates of the report's two-level bootstrap (seeds x test cases)."""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""
    preprocess_workers: int = 1
    """Processes preprocessing the pre-training and held-out studies into their caches."""
    smoke: dict = field(default_factory=dict)
    """Overrides applied by ``--smoke`` (nested or dotted keys of this config)."""


REPEAT_SEED_STRIDE = 100
"""Fine-tuning run r of pre-training seed k uses seed k + finetune_seed_offset + REPEAT_SEED_STRIDE * r."""


def flatten(tree: dict, prefix: str = "") -> list[str]:
    """Nested / dotted mapping -> ``["--a.b", "<json value>", ...]`` for ``t3d.config.load_config``."""
    out: list[str] = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out += flatten(value, dotted)
        else:
            out += [f"--{dotted}", json.dumps(value)]
    return out


def load_transfer_config(path: str | Path, smoke: bool = False, overrides: list[str] | None = None) -> TransferConfig:
    """The YAML, then its ``smoke`` section (with ``--smoke``), then command-line overrides."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    extra = flatten(raw.get("smoke") or {}) if smoke else []
    cfg = load_config(TransferConfig, path, extra + list(overrides or []))
    unknown = sorted(set(cfg.method_pretrain) - {*cfg.controls, *cfg.main_methods, *cfg.ablations})
    if unknown:  # checked before --methods narrows the lists: a worker of --jobs keeps the whole configuration
        raise ConfigError(f"{path}: method_pretrain names methods the configuration does not run: {', '.join(unknown)}")
    if cfg.seg_repeats < 1:
        raise ConfigError(f"{path}: seg_repeats must be >= 1 (segmentation fine-tuning runs per seed)")
    if cfg.seg_repeats > 1 and max([*cfg.seeds, *cfg.ablation_seeds], default=0) >= REPEAT_SEED_STRIDE:
        raise ConfigError(
            f"{path}: with seg_repeats > 1 the pre-training seeds must be < {REPEAT_SEED_STRIDE} (run r fine-tunes "
            f"with seed + finetune_seed_offset + {REPEAT_SEED_STRIDE} r, which must not repeat another seed's)"
        )
    if cfg.probes.lesion_pooling not in POOLINGS:
        raise ConfigError(f"{path}: probes.lesion_pooling must be one of {', '.join(POOLINGS)}")
    if not cfg.name:
        cfg.name = Path(path).stem + ("-smoke" if smoke else "")
    return cfg


# ----------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One cached unit of work: ``run()`` returns a JSON-ready dict, stored as ``out/result.json``."""

    name: str
    out: Path
    run: Callable[[], dict]
    meta: dict = field(default_factory=dict)
    """kind, method, seed, fraction: stored in the result, used by the report; ``settings`` (JSON), where present,
    must match the stored result's for the stage to count as done (settings outside the work folder's fingerprint)."""
    needs: tuple[str, ...] = ()
    """Names of stages whose failure makes this one pointless."""
    cached: bool = True
    """False for the report: it runs every time and stores nothing."""

    @property
    def result_path(self) -> Path:
        return self.out / RESULT

    def done(self) -> bool:
        """A stored result, computed with this stage's ``meta["settings"]`` where it has any."""
        if not (self.cached and self.result_path.is_file()):
            return False
        return (
            "settings" not in self.meta
            or json.loads(self.result_path.read_text()).get("settings") == self.meta["settings"]
        )


def run_stages(stages: list[Stage], progress: bool = True) -> dict[str, str]:
    """Run the stages in order, skipping completed ones; returns name -> cached / done / failed / skipped."""
    status: dict[str, str] = {}
    bar = tqdm(stages, desc="transfer", unit="stage", disable=not progress, dynamic_ncols=True)
    for i, stage in enumerate(bar, start=1):
        label = f"[{i}/{len(stages)}] {stage.name}"
        if stage.done():
            status[stage.name] = "cached"
            tqdm.write(f"{label}: done earlier, skipped")
            continue
        if any(status.get(n) in ("failed", "skipped") for n in stage.needs):
            status[stage.name] = "skipped"
            tqdm.write(f"{label}: skipped (a stage it needs failed)")
            continue
        bar.set_description(stage.name)
        tqdm.write(f"{label}: running")
        status[stage.name] = _run_one(stage, label)
    bar.close()
    return status


def _run_one(stage: Stage, label: str) -> str:
    t0 = time.perf_counter()
    try:
        result = stage.run()
    except Exception as err:  # one broken stage must not end a two-hour run; its dependants are skipped
        stage.out.mkdir(parents=True, exist_ok=True)
        (stage.out / "error.txt").write_text(traceback.format_exc())
        tqdm.write(f"{label}: FAILED ({type(err).__name__}: {err}); see {stage.out / 'error.txt'}")
        return "failed"
    seconds = round(time.perf_counter() - t0, 1)
    if stage.cached:
        write_json_atomic(stage.result_path, {**stage.meta, **result, "seconds": seconds, "revision": git_revision()})
        (stage.out / "error.txt").unlink(missing_ok=True)
    tqdm.write(f"{label}: finished in {seconds:.0f} s")
    return "done"
