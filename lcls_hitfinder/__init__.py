"""lcls-hitfinder: real-time single-hit classification for X-ray single-particle imaging at LCLS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lcls-hitfinder")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
