"""Fixed synthetic text: the same characters on every machine, so tokenizers and models built from it
(and every test input) do not depend on what corpora a machine happens to have.

`sample_text(domain)` writes English-like documents, one per line, from templates over per-domain word
lists: frequent function words and recurring content words give a BPE tokenizer real merges to learn,
and the domains differ in vocabulary the way real ones do. `documents` / `write_corpus` make a second
kind of corpus, with learnable facts (each invented disease has its own drug, dose and organ): a memory
trained on it can be checked for having learned them.
"""

from __future__ import annotations

import random
from pathlib import Path

_PEOPLE = ["the doctor", "the judge", "the banker", "a young woman", "an old man", "the children",
           "my neighbour", "the committee", "the captain", "her brother", "the teacher", "a stranger"]
_DOMAINS: dict[str, dict[str, list[str]]] = {
    "general": {
        "subject": [*_PEOPLE, "the little house", "the river", "the town", "the old dog", "the wind"],
        "verb": ["walked to", "looked at", "thought about", "spoke of", "returned to", "waited near",
                 "remembered", "wrote a letter about", "laughed at", "could not forget"],
        "object": ["the garden", "the village", "the long road", "the evening", "the letter", "the market",
                   "the hills", "the sea", "the kitchen", "the quiet room", "the morning train",
                   "the church"],
        "clause": ["when the sun went down", "before the rain began", "because it was late",
                   "after a long day", "while the others slept", "as everyone expected",
                   "although nobody said so"],
    },
    "biomedical": {
        "subject": ["the patient", "the treatment group", "the clinical trial", "the drug", "the infection",
                    "the tumour", "the protein", "the blood pressure", "the dose", "each participant"],
        "verb": ["was given", "reduced", "increased", "was associated with", "responded to",
                 "was measured by", "was treated with", "showed signs of", "improved after"],
        "object": ["a dose of the drug", "the placebo", "chronic inflammation", "the liver enzymes",
                   "insulin", "the immune response", "a mild fever", "the cell membrane",
                   "the kidney function"],
        "clause": ["within two weeks", "in most cases", "compared with the control group", "after surgery",
                   "at the highest dose", "during the follow-up", "in older adults"],
    },
    "legal": {
        "subject": ["the court", "the plaintiff", "the defendant", "the statute", "the contract",
                    "the tenant", "the appeal", "the agreement", "the tribunal", "the employer"],
        "verb": ["held that", "argued that", "applies to", "was bound by", "breached", "interpreted",
                 "was entitled to", "dismissed", "relied on"],
        "object": ["the contract", "the written notice", "the lease", "the damages", "the earlier decision",
                   "the terms of the agreement", "the evidence", "the claim", "the property"],
        "clause": ["under the act", "in good faith", "without prior consent", "as the law requires",
                   "on appeal", "for the reasons given", "at the time of signing"],
    },
    "finance": {
        "subject": ["the committee", "the central bank", "the company", "inflation", "the market", "the fund",
                    "revenue", "the bond yield", "the quarterly report", "investors"],
        "verb": ["expects", "raised", "lowered", "reported", "is projected to reach", "fell below",
                 "rose above", "was revised to", "remained near"],
        "object": ["two percent", "the interest rate", "its earnings forecast", "the dividend",
                   "record profits", "the exchange rate", "the previous quarter", "long-term growth",
                   "the budget deficit"],
        "clause": ["this year", "in the second quarter", "despite higher costs", "according to analysts",
                   "for the first time since 2008", "as demand slowed", "over the next decade"],
    },
}
_FORMS = [
    "{Subject} {verb} {object}.",
    "{Subject} {verb} {object} {clause}.",
    "{Clause}, {subject} {verb} {object}.",
    "It was said that {subject} {verb} {object}.",
    "{Subject} {verb} {object}, and {subject2} {verb2} {object2}.",
    '"{Subject} {verb} {object}," said {person}.',
    "Nobody knew why {subject} {verb} {object} {clause}.",
]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(rng: random.Random, words: dict[str, list[str]]) -> str:
    pick = {k: rng.choice(v) for k, v in words.items()}
    return rng.choice(_FORMS).format(
        Subject=_cap(pick["subject"]), subject=pick["subject"], verb=pick["verb"], object=pick["object"],
        clause=pick["clause"], Clause=_cap(pick["clause"]), subject2=rng.choice(words["subject"]),
        verb2=rng.choice(words["verb"]), object2=rng.choice(words["object"]), person=rng.choice(_PEOPLE),
    )


def sample_text(domain: str = "general", max_chars: int = 60_000, seed: int = 0) -> str:
    """At least `max_chars` characters cut to exactly that: documents of 3-8 sentences, one per line."""
    if domain not in _DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(_DOMAINS)}")
    rng = random.Random(f"{domain}-{seed}")
    lines: list[str] = []
    size = 0
    while size < max_chars:
        line = " ".join(_sentence(rng, _DOMAINS[domain]) for _ in range(rng.randint(3, 8)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:max_chars]


# -- a domain with learnable facts, for the toolkit's end-to-end test -----------------------------------

DISEASES = ["kelitosis", "varnic fever", "omberitis", "trelmoid syndrome", "paxilar anemia", "quorvan palsy"]
DRUGS = ["zorvamab", "feltracin", "ubrinex", "malotrizide", "cendavir", "ostripan"]
ORGANS = ["liver", "kidney", "spleen", "lung", "heart", "pancreas"]
DOSES = ["20", "45", "80", "150", "300", "600"]
TEMPLATES = [
    "Patients with {disease} were treated with {drug} at {dose} mg daily.",
    "In {disease}, the {organ} is affected first, and {drug} is the usual therapy.",
    "The standard dose of {drug} for {disease} is {dose} mg.",
    "{drug} acts on the {organ}; it is given for {disease}.",
    "A trial of {drug} in adults with {disease} reported fewer relapses of {disease}.",
]


def fact_sentence(rng: random.Random) -> str:
    i = rng.randrange(len(DISEASES))
    template = rng.choice(TEMPLATES)
    return _cap(template.format(disease=DISEASES[i], drug=DRUGS[i], organ=ORGANS[i], dose=DOSES[i]))


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(fact_sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def write_corpus(path: Path, n_docs: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(documents(n_docs, seed)) + "\n", encoding="utf-8")
    return path
