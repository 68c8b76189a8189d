"""The one kind of error a user sees: `ConfigError`, printed as one `exert-ds: error:` line on every rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class ConfigError(ValueError):
    """A mistake in the user's input (config, data, paths, files); the message is one line that names the key or
    the path and the fix."""


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn the library's ValueErrors about the user's model, data or settings into one-line ConfigErrors."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{what}: {' '.join(str(err).split())}") from err
