"""User-facing errors.

Every problem a user can cause (bad prompt, bad image, bad config, bad checkpoint, bad data)
raises a subclass of :class:`FlowTokError` whose message is one line naming the problem. The CLI
prints that line to stderr and exits with code 2; library users can catch the class they care for.
"""

from __future__ import annotations


class FlowTokError(Exception):
    """Base class: a problem with the user's input, never a bug in flowtok."""


class ConfigError(FlowTokError, ValueError):
    """A config has an unknown key, a wrong type or an impossible shape."""


class CheckpointError(FlowTokError):
    """A checkpoint or pretrained folder is missing, corrupt, or of the wrong kind or shape."""


class InvalidInputError(FlowTokError, ValueError):
    """A prompt, image or other argument to the API cannot be used."""


class DataError(FlowTokError):
    """A dataset file, shard or caption cannot be read."""


class OutputError(FlowTokError, OSError):
    """An output (image, checkpoint, export) cannot be written: a full disk, a read-only folder, a file
    where a folder should be. Nothing half-written is left behind."""
