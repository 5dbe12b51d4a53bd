"""Exceptions. Every user-facing failure is a ``BaffleError`` whose message is one line
that says what to fix; the CLI prints ``error: <message>`` and exits with status 2."""


class BaffleError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(BaffleError, ValueError):
    """A bad option value: K < 1, sigma <= 0, an unknown name, a bad flag."""


class DataError(BaffleError):
    """A data set that is missing, truncated or fails its checksum."""


class SchemeMismatchError(BaffleError):
    """Client and server would draw different perturbation directions."""


class UploadError(BaffleError):
    """A client upload that cannot be used (wrong length, non-finite values)."""
