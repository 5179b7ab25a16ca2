"""One synthetic study end to end: presets, per-study seeding, anatomy -> findings -> image -> report.

    study = sample_study(seed=0, index=7, preset="small")
    study.image        # int16 (X, Y, Z) HU, RAS+ (x index up = patient right), study.affine
    study.label        # uint8 (X, Y, Z), findings.LABEL_NAMES
    study.findings     # ground truth rows (type, organ, side, size_mm, centre_voxel, label, location, ...)
    study.report       # reports.Report with .findings / .impression text

Study ``index`` of dataset seed ``seed`` draws from ``SeedSequence(seed, spawn_key=(index,))`` — the same
numbers ``SeedSequence(seed).spawn(n)[index]`` gives — so a study never depends on how many studies are made,
on the order they are made in, or on how many processes make them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from t3d.data.synthetic.anatomy import build_torso, render
from t3d.data.synthetic.findings import FOCAL, draw_findings, sample_plan
from t3d.data.synthetic.geometry import Grid
from t3d.data.synthetic.reports import Report, write_report


@dataclass(frozen=True)
class Preset:
    """Volume size (voxels) and spacing (mm) of a synthetic dataset; anatomy scales to the field of view."""

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))


PRESETS = {
    # Tests: 74 k voxels, milliseconds per study; a 4 mm lesion is one voxel.
    "tiny": Preset("tiny", (48, 48, 32), (5.0, 5.0, 6.0)),
    # Demo / CPU benchmarks: a 5 mm lesion is 2 voxels across, so 4x downsampling erases lesions below 10 mm.
    "small": Preset("small", (112, 112, 72), (2.5, 2.5, 3.0)),
    # Typical CT sampling.
    "default": Preset("default", (256, 256, 160), (0.8, 0.8, 1.5)),
}


def make_grid(preset: str | Preset, spacing: tuple[float, float, float] | None = None) -> Grid:
    """The voxel grid of a preset; ``spacing`` (mm) overrides the preset's and keeps its field of view."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if spacing is None:
        return Grid(preset.shape, preset.spacing)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise ValueError(f"--spacing needs three positive mm values (x y z), got {spacing}")
    shape = tuple(max(16, round(f / s)) for f, s in zip(preset.fov_mm, spacing))
    return Grid(shape, spacing)


def study_id(index: int) -> str:
    return f"synth_{index:04d}"


@dataclass
class Study:
    """A generated study: arrays, geometry, ground truth and report (the id is not part of anything drawn)."""

    id: str
    image: np.ndarray  # int16 (X, Y, Z) HU
    label: np.ndarray  # uint8 (X, Y, Z)
    grid: Grid
    findings: list[dict]
    report: Report
    info: dict

    @property
    def affine(self) -> np.ndarray:
        return self.grid.affine

    def ground_truth(self) -> dict:
        """JSON-ready ground truth of the study (one line of ``ground_truth.jsonl``)."""
        return {"id": self.id, "normal": not self.findings, "findings": self.findings, **self.info}


def sample_study(
    seed: int, index: int = 0, preset: str | Preset = "tiny", spacing: tuple[float, float, float] | None = None
) -> Study:
    """Generate study ``index`` of the dataset with seed ``seed`` in memory (deterministic, no files)."""
    grid = make_grid(preset, spacing)
    # Separate streams for anatomy, findings+image and text: editing report templates leaves volumes unchanged.
    anatomy_ss, image_ss, text_ss = np.random.SeedSequence(int(seed), spawn_key=(int(index),)).spawn(3)
    rng = np.random.default_rng(anatomy_ss)
    plan = sample_plan(rng)
    torso = build_torso(grid, rng, spleen_scale=plan.spleen_scale)
    rng = np.random.default_rng(image_ss)
    findings = draw_findings(torso, plan, rng)
    image = render(torso, rng)
    report = write_report(findings, np.random.default_rng(text_ss))
    spacing_xy = max(grid.spacing[:2])
    info = {
        "shape": list(grid.shape),
        "spacing": [float(s) for s in grid.spacing],
        "contrast": torso.contrast,
        "noise_hu": round(torso.noise_hu, 2),
        "small_lesions": sum(1 for f in findings if f["type"] in FOCAL and f["size_mm"] / spacing_xy < 4),
    }
    return Study(study_id(index), image, torso.label, grid, findings, report, info)
