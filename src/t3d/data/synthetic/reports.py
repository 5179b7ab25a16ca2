"""Radiology-style reports (FINDINGS + IMPRESSION) written from a study's ground truth only.

Phrasing varies (several templates and synonyms per finding, sizes as "9 mm" or "0.9 cm", sentence order
shuffled within each organ system, headed or running-prose layout), but content is exact: every drawn finding is
described with its measured size, side and location (liver segment, lung lobe, kidney pole), every absent
finding type is explicitly negated, and nothing else is claimed. The text never sees study ids, seeds or label
values, so it cannot leak them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
SYSTEMS = (
    ("Lungs and pleura", ("lung_nodule", "pleural_effusion")),
    ("Heart", ()),
    ("Liver", ("liver_lesion", "hepatic_steatosis")),
    ("Spleen", ("splenomegaly",)),
    ("Kidneys", ("renal_cyst", "kidney_stone")),
    ("Other", ()),
)
NEGATIONS = {
    "liver_lesion": (
        "No focal liver lesion.",
        "No focal hepatic lesion is identified.",
        "The liver is without focal lesions.",
        "No focal lesion in the liver.",
    ),
    "hepatic_steatosis": (
        "Normal hepatic attenuation without steatosis.",
        "No hepatic steatosis.",
        "No evidence of fatty infiltration of the liver.",
        "The liver is of normal attenuation, without steatosis.",
    ),
    "splenomegaly": ("The spleen is normal in size.", "Normal splenic size.", "No splenomegaly."),
    "renal_cyst": ("No renal cysts.", "No renal cyst is seen.", "The kidneys are without cysts."),
    "kidney_stone": ("No nephrolithiasis.", "No renal calculi.", "No kidney stones are seen."),
    "lung_nodule": ("No pulmonary nodules.", "No suspicious pulmonary nodule.", "No lung nodules are identified."),
    "pleural_effusion": ("No pleural effusion.", "No pleural effusions.", "No pleural effusion on either side."),
}
COMBINED_NEGATIONS = {
    ("liver_lesion", "hepatic_steatosis"): ("The liver is normal in attenuation, without focal lesion or steatosis.",),
    ("renal_cyst", "kidney_stone"): ("Both kidneys are unremarkable, without cysts or calculi.",),
}
OTHER_NORMAL = {
    "Heart": (("The heart is normal in size.", "Heart size is normal."),),
    "Other": (
        ("The aorta is normal in calibre.", "No aortic aneurysm."),
        ("The visualised osseous structures are unremarkable.", "No acute osseous abnormality."),
        ("Bowel loops are unremarkable.", "Unremarkable bowel loops."),
    ),
}
"""Statements about drawn, always-normal structures: per group (synonyms) at most one, sometimes none."""
NORMAL_IMPRESSIONS = (
    "No acute abnormality.",
    "No acute findings.",
    "No acute intrathoracic or abdominal abnormality.",
    "Unremarkable CT of the chest and upper abdomen.",
)
DENSITY_WORDS = {
    "hypodense": ("hypodense", "hypoattenuating", "low-attenuation"),
    "hyperdense": ("hyperdense", "hyperattenuating", "high-attenuation"),
}


@dataclass
class Sentence:
    """One sentence and what it states: finding types (positive or negated) and the ground-truth rows it uses."""

    text: str
    kinds: tuple[str, ...] = ()
    positive: bool = False
    refs: tuple[int, ...] = ()


@dataclass
class Report:
    findings: str
    impression: str
    sentences: list[Sentence]
    """FINDINGS sentences, in text order."""
    impression_sentences: list[Sentence]


def format_size(mm: float, rng: np.random.Generator) -> str:
    """A lesion size the way reports write it: mostly "7 mm" below 1 cm, "12 mm" or "1.2 cm" above."""
    whole = int(np.floor(mm + 0.5))  # both forms round to the same whole millimetre, so sections agree
    if rng.random() < (0.75 if mm < 10 else 0.5):
        return f"{whole} mm"
    return f"{whole / 10:.1f} cm"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _count_word(n: int) -> str:
    return NUMBER_WORDS.get(n, "multiple")


def _liver_lesions(items: list[tuple[int, dict]], rng) -> tuple[list[Sentence], Sentence]:
    def loc(g):
        seg, lobe = g["segment"], g["lobe"]
        return _pick(
            rng,
            (
                f"segment {seg}",
                f"hepatic segment {seg}",
                f"the {lobe} hepatic lobe (segment {seg})",
                f"the {lobe} lobe of the liver",
            ),
        )

    refs = tuple(i for i, _ in items)
    _, big = max(items, key=lambda it: it[1]["size_mm"])
    out = []
    if len(items) <= 2:
        for i, g in items:
            size, dens, where = format_size(g["size_mm"], rng), _pick(rng, DENSITY_WORDS[g["density"]]), loc(g)
            text = _pick(
                rng,
                (
                    f"There is a {size} {dens} lesion in {where}.",
                    f"A {dens} lesion measuring {size} is seen in {where}.",
                    f"{_cap(where)} contains a {size} {dens} focal lesion.",
                    f"{_cap(dens)} focal liver lesion in {where}, measuring {size}.",
                ),
            )
            out.append(Sentence(text, ("liver_lesion",), True, (i,)))
    else:
        densities = {g["density"] for _, g in items}
        dens = _pick(rng, DENSITY_WORDS[densities.pop()]) + " " if len(densities) == 1 else ""
        n, size, where = _count_word(len(items)), format_size(big["size_mm"], rng), loc(big)
        text = _pick(
            rng,
            (
                f"{_cap(n)} {dens}liver lesions are present, the largest measuring {size} in {where}.",
                f"{_cap(n)} {dens}focal hepatic lesions, the largest {size} in {where}.",
            ),
        )
        out.append(Sentence(text, ("liver_lesion",), True, refs))
    size = format_size(big["size_mm"], rng)
    if len(items) == 1:
        dens = _pick(rng, DENSITY_WORDS[big["density"]])
        text = _pick(
            rng,
            (
                f"{_cap(dens)} liver lesion in segment {big['segment']} ({size}).",
                f"Solitary {dens} hepatic lesion, {size}.",
            ),
        )
    else:
        text = _pick(
            rng,
            (f"{_cap(_count_word(len(items)))} liver lesions, the largest {size}.", "Multiple focal liver lesions."),
        )
    return out, Sentence(text, ("liver_lesion",), True, refs)


def _sides(items) -> str:
    sides = {g["side"] for _, g in items}
    return "bilateral" if len(sides) == 2 else sides.pop()


def _kidney_lesions(kind: str, items: list[tuple[int, dict]], rng) -> tuple[list[Sentence], Sentence]:
    out = []
    for i, g in items:
        size, side, pole = format_size(g["size_mm"], rng), g["side"], g["location"]
        if kind == "renal_cyst":
            options = (
                f"There is a {size} simple cyst in the {pole} of the {side} kidney.",
                f"{_cap(side)} renal cyst measuring {size} ({pole}).",
                f"A {size} fluid-attenuation cyst arises from the {pole} of the {side} kidney.",
            )
        else:
            options = (
                f"A {size} non-obstructing calculus in the {pole} of the {side} kidney.",
                f"{_cap(side)} nephrolithiasis: a {size} stone in the {pole}.",
                f"There is a {size} stone in the {side} kidney ({pole}).",
            )
        out.append(Sentence(_pick(rng, options), (kind,), True, (i,)))
    refs, side = tuple(i for i, _ in items), _sides(items)
    size = format_size(items[0][1]["size_mm"], rng)
    if kind == "renal_cyst":
        options = [f"{_cap(side)} renal cysts." if len(items) > 1 else f"{_cap(side)} renal cyst."]
        if len(items) == 1:
            options.append(f"Simple {side} renal cyst, {size}.")
    else:
        options = [f"Non-obstructing {side} nephrolithiasis."]
        if len(items) == 1:
            options.append(f"{_cap(side)} renal calculus ({size}).")
    return out, Sentence(_pick(rng, options), (kind,), True, refs)


def _nodules(items: list[tuple[int, dict]], rng) -> tuple[list[Sentence], Sentence]:
    def kind(g):
        return "solid" if g["solidity"] == "solid" else _pick(rng, ("ground-glass", "ground glass"))

    refs = tuple(i for i, _ in items)
    _, big = max(items, key=lambda it: it[1]["size_mm"])
    out = []
    if len(items) <= 2:
        for i, g in items:
            size, k, lobe = format_size(g["size_mm"], rng), kind(g), g["location"]
            text = _pick(
                rng,
                (
                    f"There is a {size} {k} nodule in the {lobe}.",
                    f"A {k} pulmonary nodule measuring {size} is present in the {lobe}.",
                    f"{_cap(lobe)}: {size} {k} nodule.",
                ),
            )
            out.append(Sentence(text, ("lung_nodule",), True, (i,)))
    side = _sides(items)
    where = "bilateral pulmonary nodules" if side == "bilateral" else f"pulmonary nodules in the {side} lung"
    if len(items) > 2:
        size, lobe = format_size(big["size_mm"], rng), big["location"]
        text = f"{_cap(_count_word(len(items)))} {where}, the largest {size} in the {lobe}."
        out.append(Sentence(text, ("lung_nodule",), True, refs))
    size = format_size(big["size_mm"], rng)
    if len(items) == 1:
        text = f"{_cap(kind(big))} nodule in the {big['location']}, {size}."
    else:
        text = _pick(
            rng,
            (
                f"{_cap(_count_word(len(items)))} {where}, the largest {size}.",
                f"{_cap(where)}, largest {size} in the {big['location']}.",
            ),
        )
    return out, Sentence(text, ("lung_nodule",), True, refs)


def _effusions(items: list[tuple[int, dict]], rng) -> tuple[list[Sentence], Sentence]:
    refs = tuple(i for i, _ in items)
    if len(items) == 2:
        by_side = {g["side"]: g for _, g in items}
        r, le = by_side["right"]["severity"], by_side["left"]["severity"]
        text = (
            f"{_cap(r)} bilateral pleural effusions."
            if r == le
            else f"Bilateral pleural effusions, {r} on the right and {le} on the left."
        )
        return [Sentence(text, ("pleural_effusion",), True, refs)], Sentence(
            "Bilateral pleural effusions.", ("pleural_effusion",), True, refs
        )
    (_, g), size = items[0], format_size(items[0][1]["size_mm"], rng)
    sev, side = g["severity"], g["side"]
    text = _pick(
        rng,
        (
            f"{_cap(sev)} {side} pleural effusion.",
            f"There is a {sev} {side}-sided pleural effusion.",
            f"{_cap(sev)} {side} pleural effusion measuring up to {size} in depth.",
        ),
    )
    return [Sentence(text, ("pleural_effusion",), True, refs)], Sentence(
        f"{_cap(sev)} {side} pleural effusion.", ("pleural_effusion",), True, refs
    )


def _organ_change(kind: str, i: int, g: dict, rng) -> tuple[list[Sentence], Sentence]:
    if kind == "splenomegaly":
        length = f"{np.floor(g['size_mm'] + 0.5) / 10:.1f} cm"
        text = _pick(
            rng,
            (
                f"The spleen is enlarged, measuring {length} in craniocaudal length.",
                f"Splenomegaly, with a craniocaudal span of {length}.",
                f"Enlarged spleen ({length} craniocaudal).",
            ),
        )
        impression = _pick(rng, ("Splenomegaly.", "Enlarged spleen."))
    else:
        hu = int(5 * round(g["hu"] / 5))
        text = _pick(
            rng,
            (
                "Diffuse hypoattenuation of the liver parenchyma, consistent with hepatic steatosis.",
                f"The liver is diffusely low in attenuation (approximately {hu} HU), in keeping with "
                "fatty infiltration.",
                "Hepatic steatosis.",
                f"Fatty infiltration of the liver, with parenchymal attenuation of about {hu} HU.",
            ),
        )
        impression = _pick(rng, ("Hepatic steatosis.", "Diffuse fatty infiltration of the liver."))
    return [Sentence(text, (kind,), True, (i,))], Sentence(impression, (kind,), True, (i,))


def _describe(kind: str, items: list[tuple[int, dict]], rng) -> tuple[list[Sentence], Sentence]:
    if kind == "liver_lesion":
        return _liver_lesions(items, rng)
    if kind in ("renal_cyst", "kidney_stone"):
        return _kidney_lesions(kind, items, rng)
    if kind == "lung_nodule":
        return _nodules(items, rng)
    if kind == "pleural_effusion":
        return _effusions(items, rng)
    return _organ_change(kind, *items[0], rng)


def _negations(absent: list[str], rng) -> list[Sentence]:
    out = []
    for pair, options in COMBINED_NEGATIONS.items():
        if all(k in absent for k in pair) and rng.random() < 0.3:
            out.append(Sentence(_pick(rng, options), pair))
            absent = [k for k in absent if k not in pair]
    return out + [Sentence(_pick(rng, NEGATIONS[k]), (k,)) for k in absent]


def write_report(findings: list[dict], rng: np.random.Generator) -> Report:
    """FINDINGS and IMPRESSION text for a study whose ground truth is ``findings`` (``draw_findings`` rows)."""
    by_kind: dict[str, list[tuple[int, dict]]] = {}
    for i, g in enumerate(findings):
        by_kind.setdefault(g["type"], []).append((i, g))
    headed = rng.random() < 0.4
    paragraphs, sentences, impression = [], [], []
    for system, kinds in SYSTEMS:
        group = []
        for kind in kinds:
            if kind in by_kind:
                found, summary = _describe(kind, by_kind[kind], rng)
                group += found
                impression.append(summary)
        group += _negations([k for k in kinds if k not in by_kind], rng)
        for options in OTHER_NORMAL.get(system, ()):
            if rng.random() < 0.4:
                group.append(Sentence(_pick(rng, options)))
        order = rng.permutation(len(group))
        group = [group[j] for j in order]
        if group:
            sentences += group
            body = " ".join(s.text for s in group)
            paragraphs.append(f"{system}: {body}" if headed else body)
    text = ("\n" if headed else " ").join(paragraphs)
    if not impression:
        impression = [Sentence(_pick(rng, NORMAL_IMPRESSIONS))]
    elif rng.random() < 0.5:  # keep the clinically weightier findings first, as readers do, but not always
        impression = [impression[j] for j in rng.permutation(len(impression))]
    if len(impression) > 1 and rng.random() < 0.5:
        imp_text = "\n".join(f"{n}. {s.text}" for n, s in enumerate(impression, 1))
    else:
        imp_text = " ".join(s.text for s in impression)
    return Report(text, imp_text, sentences, impression)
