"""Facts a clinical answer takes from its prompt: numbers with units, sex, diagnosis (Spanish).

Deliberately simple and predictable, so a reader can tell why a fact counts:

- **numbers with a unit**: ``72 años`` → ``"72 años"``, ``6 días`` → ``"6 días"``, ``500 mg`` →
  ``"500 mg"``. Units: años/año, días/día, semanas, meses, horas (durations), mg, g, mcg/µg, ml, UI,
  mg/kg (doses), kg, mmHg, %. Singular and plural collapse to one form, decimal commas to points
  (``2,5 mg`` = ``2.5 mg``); a number without one of these units is not a fact (too ambiguous).
- **sex**: a small lexicon, normalised to one term: hombre/varón/masculino → ``"sexo: masculino"``,
  mujer/femenino/femenina → ``"sexo: femenino"``.
- **diagnosis**: a small lexicon of Spanish diagnosis terms (:data:`DIAGNOSIS_TERMS`), matched as
  whole words, case- and accent-insensitively → ``"dx: neumonía"``.

A fact of the prompt is *taken* by an answer when the answer states the same fact. ``verify
--data`` counts, per example, the facts fp32's answer takes from the prompt, and a variant *loses*
one when its own answer no longer states it (e.g. "Paciente masculino de 54 años" for a woman of 72
loses ``sexo: femenino`` and ``72 años``).
"""
from __future__ import annotations

import re
import unicodedata

# unit as written (lower case) -> canonical unit
_UNITS = {
    "años": "años", "año": "años", "días": "días", "día": "días", "dias": "días", "dia": "días",
    "semanas": "semanas", "semana": "semanas", "meses": "meses", "mes": "meses", "horas": "horas", "hora": "horas",
    "mg/kg": "mg/kg", "mg": "mg", "g": "g", "gr": "g", "mcg": "mcg", "µg": "mcg", "ug": "mcg", "ml": "ml",
    "ui": "UI", "kg": "kg", "mmhg": "mmHg", "%": "%",
}
# Longest first, so "mg/kg" wins over "mg" and "meses" over "mes".
_UNIT_ALT = "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
NUMBER_WITH_UNIT = re.compile(rf"(?<![\w.,])(\d+(?:[.,]\d+)?)\s*({_UNIT_ALT})(?![\w/])", re.IGNORECASE)

SEX_TERMS = {"hombre": "masculino", "varon": "masculino", "masculino": "masculino",
             "mujer": "femenino", "femenino": "femenino", "femenina": "femenino"}

# Canonical diagnosis term -> spellings (accent-free, lower case) that mean it.
DIAGNOSIS_TERMS: dict[str, tuple[str, ...]] = {
    "neumonía": ("neumonia",),
    "insuficiencia cardíaca": ("insuficiencia cardiaca",),
    "apendicitis": ("apendicitis",),
    "diabetes": ("diabetes",),
    "EPOC": ("epoc", "enfermedad pulmonar obstructiva cronica"),
    "infección urinaria": ("infeccion urinaria", "infeccion del tracto urinario", "itu", "pielonefritis"),
    "accidente cerebrovascular": ("accidente cerebrovascular", "acv", "ictus"),
    "hemorragia digestiva": ("hemorragia digestiva",),
    "celulitis": ("celulitis",),
    "fibrilación auricular": ("fibrilacion auricular",),
    "pancreatitis": ("pancreatitis",),
    "crisis hipertensiva": ("crisis hipertensiva",),
    "hipertensión": ("hipertension arterial",),
    "infarto": ("infarto", "iam"),
    "asma": ("asma",),
    "sepsis": ("sepsis",),
    "insuficiencia renal": ("insuficiencia renal",),
    "cirrosis": ("cirrosis",),
    "colecistitis": ("colecistitis",),
    "tromboembolismo pulmonar": ("tromboembolismo pulmonar", "embolia pulmonar", "tep"),
    "trombosis venosa": ("trombosis venosa", "tvp"),
    "anemia": ("anemia",),
    "fractura": ("fractura",),
    "COVID-19": ("covid-19", "covid"),
}


def _fold(text: str) -> str:
    """Lower case without accents (ñ kept), so 'Neumonía' matches 'neumonia'."""
    text = unicodedata.normalize("NFD", text.lower().replace("ñ", "\0"))
    return "".join(c for c in text if unicodedata.category(c) != "Mn").replace("\0", "ñ")


def _words(pattern: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(pattern)}(?![\w-])")


_SEX_RE = [(_words(w), v) for w, v in SEX_TERMS.items()]
_DX_RE = [(_words(s), canon) for canon, spellings in DIAGNOSIS_TERMS.items() for s in spellings]


def extract_facts(text: str) -> set[str]:
    """The facts stated in ``text``: ``"72 años"``, ``"500 mg"``, ``"sexo: femenino"``, ``"dx: neumonía"``."""
    facts = set()
    for num, unit in NUMBER_WITH_UNIT.findall(text):
        facts.add(f"{num.replace(',', '.')} {_UNITS[unit.lower()]}")
    folded = _fold(text)
    facts.update(f"sexo: {v}" for rx, v in _SEX_RE if rx.search(folded))
    facts.update(f"dx: {canon}" for rx, canon in _DX_RE if rx.search(folded))
    return facts


def facts_taken(prompt: str, answer: str) -> set[str]:
    """The prompt's facts that the answer states too."""
    return extract_facts(prompt) & extract_facts(answer)
