"""Helpers shared by the tests and the benchmarks: a synthetic corpus, tiny random-init models built from
configs, and `memdec serve` as a real process. Nothing here reads files outside the repository or downloads
anything. Not part of the installed package (the wheel ships `server` and `memories` only)."""
