"""Small lm-evaluation-harness tasks over local files, so that `lm_eval` can run against `memdec serve`
without downloading a data set: `memdec_mc` (multiple choice: log-likelihoods) and `memdec_gen`
(generate_until).

    python -m testkit.lm_eval_tasks DIR    # writes DIR/memdec_mc.yaml, DIR/memdec_gen.yaml and their data
    lm_eval run --model local-completions --include_path DIR --tasks memdec_mc,memdec_gen \
        --model_args model=biomed,base_url=http://localhost:8000/v1/completions

The documents come from `testkit.text` (the fixed synthetic generator), so every machine gets the same tasks.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from testkit.text import sample_text

MC_TASK = "memdec_mc"
GEN_TASK = "memdec_gen"
GEN_MAX_TOKENS = 6
GEN_UNTIL = ["\n", "."]


def _sentences(domain: str, count: int, seed: int) -> list[str]:
    text = sample_text(domain, 20_000, seed=seed)
    sentences = [s.strip() + "." for line in text.splitlines() for s in line.split(".")
                 if len(s.split()) >= 6]
    return random.Random(seed).sample(sentences, count)


def multiple_choice_docs(count: int = 6) -> list[dict]:
    """Each: a biomedical sentence's opening, its true ending, and a legal sentence's ending as the foil."""
    docs = []
    for i, (bio, law) in enumerate(zip(_sentences("biomedical", count, 1), _sentences("legal", count, 2),
                                       strict=True)):
        words, foil = bio.split(), law.split()
        cut = len(words) // 2
        choices = [" ".join(words[cut:]), " ".join(foil[len(foil) // 2 :])]  # lm-eval puts " " before each
        label = i % 2  # the true ending first or second
        docs.append({"context": " ".join(words[:cut]), "choices": choices[::-1] if label else choices,
                     "label": label})
    return docs


def generation_docs(count: int = 3) -> list[dict]:
    """Each: a biomedical sentence's opening to continue, and its ending as the (toy models' unreachable)
    target."""
    docs = []
    for sentence in _sentences("biomedical", count, 3):
        words = sentence.split()
        docs.append({"prompt": " ".join(words[:4]), "target": " " + " ".join(words[4:])})
    return docs


def _yaml(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def write_tasks(out_dir: Path) -> Path:
    """Both tasks' YAML and JSON-lines data in `out_dir` (data paths absolute, as lm-eval needs them)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, docs in ((MC_TASK, multiple_choice_docs()), (GEN_TASK, generation_docs())):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    common = ["dataset_path: json", "test_split: test", "dataset_kwargs:", "  data_files:"]
    (out_dir / f"{MC_TASK}.yaml").write_text(_yaml([
        f"task: {MC_TASK}", *common, f"    test: {out_dir / (MC_TASK + '.jsonl')}",
        "output_type: multiple_choice", 'doc_to_text: "{{context}}"', 'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{label}}"', "metric_list:", "  - metric: acc",
    ]), encoding="utf-8")
    (out_dir / f"{GEN_TASK}.yaml").write_text(_yaml([
        f"task: {GEN_TASK}", *common, f"    test: {out_dir / (GEN_TASK + '.jsonl')}",
        "output_type: generate_until", 'doc_to_text: "{{prompt}}"', 'doc_to_target: "{{target}}"',
        "generation_kwargs:", f"  until: {json.dumps(GEN_UNTIL)}", f"  max_gen_toks: {GEN_MAX_TOKENS}",
        "  temperature: 0", "metric_list:", "  - metric: exact_match",
    ]), encoding="utf-8")
    return out_dir


if __name__ == "__main__":
    print(write_tasks(Path(sys.argv[1] if len(sys.argv) > 1 else "lm_eval_tasks")))
