"""User-facing failure families.

Each exception carries a one-line message that names the file (or thing) and the problem, and
says what to do. The CLI prints ``str(error)`` and exits non-zero instead of a traceback.
"""

from __future__ import annotations


class CvglError(Exception):
    """Base class for every error the CLI reports as one line."""


class InputError(CvglError):
    """A user-supplied file (image, raster, CSV, config) is missing, unreadable or unusable."""


class WeightsError(CvglError):
    """Model weights could not be found, converted, verified or matched to an architecture."""


class IndexMismatchError(CvglError):
    """An index was opened with an encoder (or alignment) other than the one that built it."""


class IndexFormatError(CvglError):
    """An index folder is incomplete, corrupt or of an unknown format version."""
