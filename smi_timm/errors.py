"""The exceptions of smi-timm: one base class, a few kinds.

Every exception the library raises on purpose derives from :class:`SmiTimmError`, so a caller can catch the
library's errors (and only those) with one clause. Each kind also derives from the built-in exception it replaces
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so code written against the built-ins keeps working.
The command-line tools map them to exit codes in one place (:data:`smi_timm.cli.common.EXIT_CODES`).

=====================  =========================  ===================================================================
class                  also a                     raised for
=====================  =========================  ===================================================================
``ConfigError``        ``ValueError``             an option, argument or combination of settings that is not valid
``InputError``         ``ValueError``             a value passed in (tensor shape or dtype, a number out of range)
``DataError``          ``ValueError``             data that cannot be read or used (corrupt shards, missing labels)
``NotFoundError``      ``FileNotFoundError``      a path that does not exist or is not what it should be
``DataStallError``     ``RuntimeError``           a data pipeline that stopped producing samples mid-run
``WeightsError``       ``RuntimeError``           weights that do not fit, are corrupt, or are not published
``TrainingError``      ``RuntimeError``           a run that cannot continue (a non-finite loss)
``CheckpointError``    ``RuntimeError``           a checkpoint that cannot be written (a full disk, permissions)
=====================  =========================  ===================================================================

The specific classes (``WeightsMismatchError``, ``NonFiniteLossError``, ...) live next to the code that raises
them and derive from these.
"""
from __future__ import annotations

__all__ = ["SmiTimmError", "ConfigError", "InputError", "DataError", "NotFoundError", "DataStallError",
           "WeightsError", "TrainingError", "CheckpointError"]


class SmiTimmError(Exception):
    """Base class of every exception smi-timm raises on purpose."""


class ConfigError(SmiTimmError, ValueError):
    """An option, argument or combination of settings that is not valid; the message names the fix."""


class InputError(SmiTimmError, ValueError):
    """A value passed to a function that it cannot take (a tensor's shape or dtype, a number out of range)."""


class DataError(SmiTimmError, ValueError):
    """Data that cannot be read or used: corrupt or empty shards, missing or invalid labels, unknown epoch length."""


class NotFoundError(SmiTimmError, FileNotFoundError):
    """A file or folder that does not exist, or is not what the caller said it is."""


class DataStallError(SmiTimmError, RuntimeError):
    """A data pipeline that stopped producing usable samples in the middle of a run."""


class WeightsError(SmiTimmError, RuntimeError):
    """Weights that do not fit an architecture, are corrupt, or have not been published."""


class TrainingError(SmiTimmError, RuntimeError):
    """A training run that cannot continue."""


class CheckpointError(SmiTimmError, RuntimeError):
    """A checkpoint that cannot be written (a full disk, permissions); the last good one is intact."""
