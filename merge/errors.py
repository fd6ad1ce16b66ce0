"""One exception hierarchy; every message is a single line a user can act on.

The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback unless
``--debug``. Builtin parents keep ``except ValueError`` / ``except FileNotFoundError`` working.
"""

from __future__ import annotations


class AdaptError(Exception):
    """Base class of every error adapt raises on purpose."""

    exit_code = 1


class InputError(AdaptError):
    """Raised when an input file or folder cannot be read as what it claims to be."""

    exit_code = 3


class SourceNotFoundError(InputError, FileNotFoundError):
    """Raised when an input path does not exist or holds no weights adapt can read."""


class CorruptFileError(InputError, ValueError):
    """Raised when a file is not a valid safetensors file (bad header, truncated, overlaps)."""


class MismatchError(AdaptError, ValueError):
    """Raised when inputs do not describe the same model (names, shapes, dtypes, values)."""

    exit_code = 4


class NonFiniteError(AdaptError, ValueError):
    """Raised when an input tensor holds NaN or Inf and ``allow_nonfinite`` is off."""

    exit_code = 5


class ParameterError(AdaptError, ValueError):
    """Raised when a method parameter or option is out of range or inconsistent."""

    exit_code = 2


class OutputError(AdaptError, OSError):
    """Raised when the output cannot be written (not writable, would overwrite an input, exists)."""

    exit_code = 6


class HubError(AdaptError, OSError):
    """Raised when the Hugging Face Hub cannot be used (unreachable, server error, offline push)."""

    exit_code = 10


class RepoNotFoundError(HubError):
    """Raised when a Hub repository does not exist or the token has no access to it."""

    exit_code = 11


class GatedRepoError(HubError):
    """Raised when a Hub repository is gated and the token has not been granted access."""

    exit_code = 12


class RevisionNotFoundError(HubError):
    """Raised when a branch, tag, commit or PR ref does not exist in a Hub repository."""

    exit_code = 13


class HubFileNotFoundError(HubError):
    """Raised when a Hub repository has no such file (or no file an input needs)."""

    exit_code = 14


class NotCachedError(HubError):
    """Raised offline (or with the Hub unreachable) when files are not in the local cache."""

    exit_code = 15


class BadRepoIdError(HubError, ValueError):
    """Raised when a repository id or ``hf://`` reference is malformed."""

    exit_code = 16


class TokenRequiredError(HubError):
    """Raised when a push finds no Hugging Face token."""

    exit_code = 17


class UploadRefusedError(HubError):
    """Raised when the Hub refuses a push (no write access, rejected token or files)."""

    exit_code = 18
