"""Errors a user can fix: the CLI prints them as one line, without a traceback."""


class MlxMoeError(Exception):
    """Base class for problems with the user's input (files, keys, options)."""


class CheckpointError(MlxMoeError):
    """A model folder or hub id that cannot be loaded as it is."""
