"""A corpus made of named sources, and leave-one-source-out splits of it.

A memory that is judged on text from the sources its datastore came from can look good by memorising them
(templated sources repeat nearly verbatim); judged on a source it never saw, it shows whether it learned the
domain. So the toolkit can hold whole sources out: their lines never reach the datastore, and their held-out
text is where α is chosen.

Sources are known in one of two ways:
- a directory corpus (and a directory of held-out files), one file per source, named by the file's stem;
- a JSON file of line ranges, as `../shared/data/sources.json` writes them:
  `{"train.txt": [{"source": "medquad", "lines": [0, 25259]}, …], "valid.txt": […]}`, optionally one such
  mapping per domain (`{"biomedical": {…}}`, chosen with `domain`). Line numbers are 0-based, end exclusive,
  and count every line of the file (blank ones too).

`holdout_split` writes the datastore text (the kept sources, interleaved document by document so that a token
cap takes from every source) and one held-out file per source; `domain_holdout` does it for a domain of a
data directory laid out like `../shared/data`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memories.corpus import TEXT_SUFFIXES, CorpusError, no_text_files
from memories.jsonfile import read_json

FILES = "files"  # the `--sources` value that makes each file of a directory corpus a source


@dataclass(frozen=True)
class SourceTexts:
    """Each source's documents (non-empty lines) in one file set: name -> documents."""

    docs: dict[str, list[str]]

    def names(self) -> list[str]:
        return list(self.docs)


@dataclass(frozen=True)
class HoldoutSplit:
    """What a leave-sources-out build reads: the datastore text and the evaluation texts by source."""

    datastore: Path  # the kept sources' corpus documents, interleaved
    heldout: dict[str, Path]  # held-out source -> its evaluation text (cross-source)
    in_source: dict[str, Path]  # kept source -> its evaluation text (shares a source with the datastore)
    kept: tuple[str, ...]
    datastore_docs: dict[str, int]  # documents per kept source in the datastore text


def _non_empty(lines: Iterable[str]) -> list[str]:
    return [line.rstrip("\r\n") for line in lines if line.strip()]


def _read_lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.readlines()


def _ranges_for(spec: dict, file_name: str) -> list[tuple[str, int, int]]:
    if file_name not in spec:
        raise CorpusError(f"the sources file has no entry for {file_name!r} (it has {sorted(spec)})")
    return [(e["source"], int(e["lines"][0]), int(e["lines"][1])) for e in spec[file_name]]


def load_spec(path: str | Path, domain: str | None = None) -> dict:
    """A sources JSON: the per-file mapping, or the mapping of the given domain in a per-domain file."""
    spec = read_json(Path(path))
    if domain is not None and domain in spec and isinstance(spec[domain], dict):
        return dict(spec[domain])
    if all(isinstance(v, list) for v in spec.values()):
        return dict(spec)
    raise CorpusError(f"{path}: no line ranges for domain {domain!r} (domains: {sorted(spec)})")


def read_sources(path: str | Path, spec: dict | None = None) -> SourceTexts:
    """The documents of each source of a file (line ranges from `spec`) or of a directory (one file each)."""
    path = Path(path)
    if spec is not None:
        if not path.is_file():
            raise CorpusError(f"{path}: line ranges need a single text file")
        lines = _read_lines(path)
        return SourceTexts({name: _non_empty(lines[a:b]) for name, a, b in _ranges_for(spec, path.name)})
    if not path.is_dir():
        raise CorpusError(f"{path}: sources without a line-range file need a directory, one file per source")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise no_text_files(path)
    return SourceTexts({p.stem: _non_empty(_read_lines(p)) for p in files})


def interleave(groups: Sequence[list[str]]) -> list[str]:
    """Round-robin, one document of each group in turn, until every group is used up."""
    return [d for row in itertools.zip_longest(*groups) for d in row if d is not None]


def _write(path: Path, docs: list[str]) -> Path:
    """Unchanged files keep their mtime, so the build cache still trusts what was built from them."""
    text = "".join(d + "\n" for d in docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return path


def holdout_split(
    corpus: str | Path, valid: str | Path | None, heldout: Sequence[str], out_dir: str | Path,
    spec: dict | None = None,
) -> HoldoutSplit:
    """Hold the `heldout` sources out of the datastore; their held-out text is the valid file's lines of that
    source, or (no valid file) their corpus lines, which the datastore never sees either."""
    train = read_sources(corpus, spec)
    unknown = [s for s in heldout if s not in train.docs]
    if unknown:
        raise CorpusError(f"unknown source(s) {unknown}; the corpus has {train.names()}")
    kept = tuple(s for s in train.names() if s not in heldout)
    if not kept:
        raise CorpusError("every source is held out: nothing is left for the datastore")
    evaluation = read_sources(valid, spec) if valid is not None else None
    out = Path(out_dir)
    datastore = _write(out / "datastore.txt", interleave([train.docs[s] for s in kept]))

    def eval_text(source: str, kind: str) -> Path | None:
        docs = evaluation.docs.get(source) if evaluation is not None else None
        if docs is None and kind == "heldout":
            docs = train.docs[source]
        return _write(out / kind / f"{source}.txt", docs) if docs else None

    held = {s: p for s in heldout if (p := eval_text(s, "heldout")) is not None}
    in_source = {s: p for s in kept if (p := eval_text(s, "in-source")) is not None}
    return HoldoutSplit(datastore, held, in_source, kept, {s: len(train.docs[s]) for s in kept})


def domain_holdout(data_dir: str | Path, domain: str, source: str | None,
                   out_dir: str | Path) -> HoldoutSplit:
    """Leave-one-source-out for a domain of a data directory laid out like `../shared/data`
    (`<domain>/train.txt`, `<domain>/valid.txt`, `sources.json`): the held-out source's valid text and the
    other sources' train text. `source=None` holds nothing out (every source in the datastore)."""
    data = Path(data_dir)
    spec = load_spec(data / "sources.json", domain)
    return holdout_split(data / domain / "train.txt", data / domain / "valid.txt", [source] if source else [],
                         out_dir, spec)
