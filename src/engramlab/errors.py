"""Exceptions that name the problem and the fix.

Every error raised on bad input derives from :class:`EngramError`, so a CLI or a notebook can
catch the whole family and show the message as is: the messages are written for people.
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ModelNotFoundError(EngramError, FileNotFoundError):
    """A model spec that is neither a registry name, a local folder, a GGUF file nor reachable."""


class UnsupportedArchitectureError(EngramError, ValueError):
    """A model whose layout engramlab does not know (and nobody registered)."""


class PointError(EngramError, KeyError):
    """A hook point name that is malformed or out of range."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DeltaMismatchError(EngramError, ValueError):
    """A weight delta applied to a model it was not made for."""


class CacheError(EngramError, OSError):
    """A cache entry that is corrupt or does not match its key."""


class RequestError(EngramError, ValueError):
    """An edit request or data record that cannot be used as given."""


class SettingsError(EngramError, ValueError):
    """Settings that cannot work together (e.g. a data split that leaves no training text)."""


class ConceptError(EngramError, ValueError):
    """A concept to erase that cannot be used: unknown name, no probes, malformed file."""


class InputError(EngramError, ValueError):
    """A file given as input that cannot be read as what it should be (encoding, format)."""


class OutputError(EngramError, OSError):
    """An output location that cannot be written, or that another run is writing."""


class ModelLoadError(EngramError, OSError):
    """A model whose files exist but cannot be read (missing weights, truncated, corrupt)."""
