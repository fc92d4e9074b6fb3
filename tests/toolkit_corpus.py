"""A synthetic domain corpus with learnable structure, for toolkit tests.

Sentences come from a few templates over invented domain words ("zorvamab", "kelitosis", …) with
fixed associations (each disease has its drug, dose and organ). A model trained on general English
has never seen these words or links; a memory trained on this corpus can learn them, so a held-out
split measures whether the memory really captured the domain.
"""

from __future__ import annotations

import random
from pathlib import Path

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


def sentence(rng: random.Random) -> str:
    i = rng.randrange(len(DISEASES))
    template = rng.choice(TEMPLATES)
    text = template.format(disease=DISEASES[i], drug=DRUGS[i], organ=ORGANS[i], dose=DOSES[i])
    return text[0].upper() + text[1:]


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def write_corpus(path: Path, n_docs: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(documents(n_docs, seed)) + "\n", encoding="utf-8")
    return path
