"""memdec's server: the HTTP API, the engine and what they share."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memdec")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
