"""Bad input of the downstream commands as clear one-line errors on the command line."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from skysense.tasks.errors import ConfigError, is_input_error

log = logging.getLogger(__name__)

# Errors the downstream code raises for bad files, paths and settings (each names the file,
# band, modality or field at fault); anything else is a bug and keeps its traceback.
INPUT_ERRORS = (FileNotFoundError, FileExistsError, ValueError, KeyError)


@contextmanager
def as_config_errors(what: str):
    """Turn :data:`INPUT_ERRORS` into :class:`ConfigError` (`skysense` prints it, exit code 2);
    the traceback stays in the debug log."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except ConfigError:
        raise
    except MissingMandatoryValue as e:
        raise ConfigError(
            str(e.full_key), "required (???): set it, e.g. on the command line"
        ) from e
    except INPUT_ERRORS as e:
        if is_input_error(e):  # already one line naming the file (checkpoints, data readers)
            raise
        log.debug("%s failed", what, exc_info=True)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(what, f"{type(e).__name__}: {msg}") from e
