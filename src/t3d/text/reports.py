"""Radiology report text: section selection, cleaning and sentence splitting (docs/method.md §2).

Real reports arrive in many shapes (see the radmatch few-shot bundles used in the tests): one long line per section
with runs of spaces where line breaks were, text hard-wrapped at ~70 characters in the middle of sentences, bullet
and numbered lists, headers with or without a colon ("FINDINGS:", "Impression", "INDICATION :"), titles and
signatures, and de-identification placeholders ("___", "[**Name**]", "[DATE]", "<HCW>"). What the image encoder
should be told about is the findings and the impression; everything else (indication, technique, comparison,
dose statements, signatures) describes the request or the scanner, not the image, and is dropped.

    findings, impression = split_sections(raw)
    text = clean_report(findings, impression, sections="both")   # what the frozen text encoder sees
    sentences = split_sentences(text)                            # for align=sentence (docs/method.md §4)
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

SECTIONS = ("both", "findings", "impression")

# Header names -> section. Anything under an "other" header is not about the image and is dropped.
_FINDINGS = ("findings and impression", "findings/impression", "findings", "finding", "report")
_IMPRESSION = ("impressions", "impression", "conclusions", "conclusion", "opinion", "summary", "assessment")
_OTHER = (
    "clinical indication", "clinical information", "clinical history", "clinical data", "clinical details",
    "indications", "indication", "history", "reason for examination", "reason for exam", "reason for study",
    "examination", "exam", "procedure", "technique", "protocol", "comparisons", "comparison", "contrast",
    "radiation dose reduction", "radiation dose", "dose", "final report", "preliminary report", "addendum",
    "recommendations", "recommendation", "attestation", "notification", "electronically signed by", "signed by",
)  # fmt: skip
_KIND = {**{n: "other" for n in _OTHER}, **{n: "findings" for n in _FINDINGS}, **{n: "impression" for n in _IMPRESSION}}
_NAMES = "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in sorted(_KIND, key=len, reverse=True))
# Header candidates; _headers() keeps those at the start of a line (colon optional: "IMPRESSION", "Findings :") and
# mid-line ones with a colon after a sentence end or in capitals ("... normal. Impression: ...", "...   FINDINGS: ").
_HEADER = re.compile(rf"(?:^|(?<=[\s.!?]))(?P<name>{_NAMES})[ \t]*(?P<colon>:|$)[ \t]*", re.IGNORECASE | re.MULTILINE)

# De-identification placeholders: MIMIC "___" and "[**...**]", bracketed capitals "[DATE]", "[FIRST NAME]",
# numbered tags "[date_1]", "[radiologist_1]", angle tags "<HCW>". "[DATE:440]" is a de-identifier that mis-tagged an
# image number (radmatch README): the number is kept.
_TAGGED_NUMBER = re.compile(r"\[[A-Z][A-Z ]*:\s*(\d+)\]")
_PLACEHOLDER = re.compile(r"_{2,}|\[\*\*.*?\*\*\]|\[[A-Z][A-Z ]*[A-Z]\]|\[[a-z]+_\d+\]|<[A-Z]{2,}>")
_SIGNATURE_LEFTOVER = re.compile(r"^(?:(?:dr|md|m\.d|do|phd|mbbs|frcr|by|and|,|\.|-|:)\.?\s*)*$", re.IGNORECASE)
_LIST_MARKER = re.compile(r"^(?:[-*•·▪‣◦]|\d{1,2}[.)])(?:\s+|$)")
_TERMINAL = (".", "!", "?", ":", ";")

# Words whose trailing period does not end a sentence. "no"/"fig" only before a number ("image no. 45").
_ABBREVIATIONS = {
    "dr", "drs", "mr", "mrs", "ms", "prof", "st", "vs", "v", "e.g", "eg", "i.e", "ie", "cf", "approx", "appr",
    "a.m", "p.m", "incl", "resp", "al", "ca", "sr", "jr", "viz", "w.r.t", "u.s", "b.i.d", "t.i.d",
}  # fmt: skip
_NUMBER_ABBREVIATIONS = {"no", "nos", "fig", "figs", "nr", "ser", "im", "img", "vol", "sl"}
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+")


def report_hash(text: str) -> str:
    """sha256 hex digest of the UTF-8 text: the cache key of a report or sentence (never log the text itself)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_sections(report: str) -> tuple[str, str]:
    """Split a free-text report into ``(findings, impression)``, both raw (clean them with :func:`clean_report`).

    Headers are matched case-insensitively at the start of a line ("FINDINGS:", "Impression", "CONCLUSION :") or
    mid-line with a colon after a sentence end ("... no effusion. IMPRESSION: ..."). Text under indication,
    technique, comparison, dose, signature-type headers and a title before the first header are dropped. A report
    without a findings or impression header is all findings: the text before its first (non-image) header, or the
    whole text when that is empty. Repeated sections (two FINDINGS blocks) are concatenated.
    """
    text = _normalise_unicode(report)
    parts: dict[str, list[str]] = {"preamble": [], "findings": [], "impression": [], "other": []}
    last_end, kind = 0, "preamble"
    for start, end, new_kind in _headers(text):
        parts[kind].append(text[last_end:start])
        last_end, kind = end, new_kind
    parts[kind].append(text[last_end:])
    findings, impression = "\n".join(parts["findings"]).strip(), "\n".join(parts["impression"]).strip()
    if not findings and not impression:
        findings = "\n".join(parts["preamble"]).strip() or text.strip()
    return findings, impression


def clean_report(findings: str, impression: str = "", sections: str = "both") -> str:
    """The report text fed to the frozen encoder: the chosen sections, cleaned, findings before impression.

    ``sections`` is ``both``, ``findings`` or ``impression`` (``text.sections``); when the chosen section is empty
    the other one is used, so that no study is left with an empty report. Cleaning: Unicode NFKC, leading section
    headers stripped, de-identification placeholders removed (signature lines that only held a name are dropped),
    hard-wrapped lines re-joined into sentences while list items and one-finding-per-line layouts keep their line
    breaks, spaces collapsed, at most one blank line in a row (between sections). Returns ``""`` for empty input.
    """
    if sections not in SECTIONS:
        raise ValueError(f"sections={sections!r} is not one of {', '.join(SECTIONS)} (config key text.sections)")
    parts = {"findings": _clean_section(findings or ""), "impression": _clean_section(impression or "")}
    if sections == "both":
        chosen = [p for p in parts.values() if p]
    else:
        other = "impression" if sections == "findings" else "findings"
        chosen = [parts[sections] or parts[other]]
    return "\n\n".join(p for p in chosen if p)


def split_sentences(text: str) -> list[str]:
    """Split cleaned report text into sentences (for sentence-level alignment, docs/method.md §4).

    Line breaks are boundaries (:func:`clean_report` keeps only meaningful ones); within a line, ``.``/``!``/``?``
    followed by whitespace ends a sentence unless the next word starts lower-case, the period belongs to a decimal
    ("0.9 cm", "3.5 mm": no space after it), an abbreviation ("approx.", "e.g.", "Dr.", "vs.", "no. 4") or an
    initial, or is a list marker ("2. Subtle nodular contour" stays one sentence, without the "2."). Short heading
    lines ending in ``:`` ("Chest:") are joined to the sentence that follows, a trailing "(remark)" to the one before.
    Pieces without letters are dropped.
    """
    sentences: list[str] = []
    pending_heading = ""
    for line in _normalise_unicode(text).split("\n"):
        for piece in _split_line(line):
            piece = _LIST_MARKER.sub("", piece.strip()).strip()
            if not re.search(r"[A-Za-z]", piece):
                continue
            if piece.endswith(":") and len(piece.split()) <= 6:
                pending_heading = f"{pending_heading} {piece}".strip()
                continue
            if piece.startswith("(") and sentences and not pending_heading:
                sentences[-1] = f"{sentences[-1]} {piece}"  # "... location. (falx calcification)"
                continue
            sentences.append(f"{pending_heading} {piece}".strip())
            pending_heading = ""
    if pending_heading:
        sentences.append(pending_heading)
    return sentences


# ----------------------------------------------------------------------------------------------- helpers


def _squash(name: str) -> str:
    return " ".join(name.lower().split())


def _headers(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the section headers in ``text``; see _HEADER for which candidates count."""
    found = []
    for m in _HEADER.finditer(text):
        before = text[text.rfind("\n", 0, m.start()) + 1 : m.start()].strip()
        mid_line_ok = m["colon"] == ":" and (before.endswith((".", "!", "?")) or m["name"].isupper())
        if not before or mid_line_ok:
            found.append((m.start(), m.end(), _KIND[_squash(m["name"])]))
    return found


def _normalise_unicode(text: str) -> str:
    """NFKC (non-breaking spaces, full-width forms), unified newlines, no tabs or zero-width characters."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"[\u200b-\u200d\ufeff]", "", text).replace("\t", " ")


def _strip_placeholders(line: str) -> str | None:
    """Remove de-identification placeholders from one line; ``None`` if only a signature remains."""
    if not (_PLACEHOLDER.search(line) or _TAGGED_NUMBER.search(line)):
        return line
    line = _PLACEHOLDER.sub(" ", _TAGGED_NUMBER.sub(r"\1", line))
    # Tidy what the removal leaves behind: "( )", "with  by", " ." and ", ,".
    line = re.sub(r"\(\s*[-,;:]?\s*\)", "", line)
    line = re.sub(r"\s+([.,;:)])", r"\1", re.sub(r"([(])\s+", r"\1", line))
    line = re.sub(r"([-,;:])(?:\s*[-,;:])+", r"\1", line)
    return None if _SIGNATURE_LEFTOVER.match(line.strip()) else line


def _is_hard_wrapped(lines: list[str]) -> bool:
    """Text wrapped at a fixed width breaks mid-sentence: many lines end without punctuation, next starts lower."""
    pairs = [(a, b) for a, b in zip(lines, lines[1:]) if a and b]
    if not pairs:
        return False
    wraps = sum(1 for a, b in pairs if not a.endswith(_TERMINAL) and b[0].islower())
    return wraps >= max(1, 0.2 * len(pairs))


def _clean_section(text: str) -> str:
    """Clean one section: headers, placeholders, whitespace, wrapped lines, blank lines (see clean_report)."""
    text = _normalise_unicode(text)
    text = text.strip()
    m = _HEADER.match(text)
    if m and _KIND[_squash(m["name"])] != "other":  # "Findings: ..." passed in as the findings column
        text = text[m.end() :]
    lines = []
    for raw in text.split("\n"):
        line = _strip_placeholders(raw)
        if line is None:
            continue
        line = re.sub(r" {2,}", " ", line).strip()
        line = re.sub(r"\s+\.(?=\s|$)", ".", re.sub(r"\s+([:;,])", r"\1", line))  # "INDICATION :", "nodule ."
        lines.append(re.sub(r"(?<!\.)\.\.(?!\.)", ".", line))  # "lobe.." -> "lobe." (keeps "...")
    wrapped = _is_hard_wrapped(lines)
    out: list[str] = []
    for line in lines:
        if not line:
            if out and out[-1] != "":
                out.append("")  # one blank line, never two
            continue
        if wrapped and out and out[-1] and not _LIST_MARKER.match(line) and not out[-1].endswith((".", "!", "?", ":")):
            joiner = "" if re.search(r"[A-Za-z0-9]-$", out[-1]) else " "  # "3-\nD" -> "3-D"
            out[-1] = out[-1] + joiner + line
        else:
            out.append(line)
    return "\n".join(out).strip()


def _split_line(line: str) -> list[str]:
    """Split one line at sentence-ending punctuation, honouring decimals, abbreviations and list markers."""
    pieces, start = [], 0
    for m in _BOUNDARY.finditer(line):
        end = m.end()
        if end >= len(line):
            break
        before = line[start : m.start()].strip()
        nxt = line[end]
        if nxt.islower() or re.fullmatch(r"\d{1,2}", before):
            continue  # "... e.g. the", or the "2." of a numbered item
        word = re.split(r"[\s(\[]", line[start : m.start()])[-1].lower()
        if word in _ABBREVIATIONS or (word in _NUMBER_ABBREVIATIONS and nxt.isdigit()):
            continue
        if re.fullmatch(r"[a-z]", word) and line[m.start()] == ".":
            continue  # an initial ("J. Smith")
        pieces.append(line[start:end].strip())
        start = end
    pieces.append(line[start:].strip())
    return [p for p in pieces if p]
