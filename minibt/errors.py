"""Every error minibt raises on purpose. The message names the file, key, shape or limit at fault."""


class MinibtError(Exception):
    """Base class: catch this to handle any problem minibt reports."""


class CheckpointError(MinibtError):
    """Missing, unexpected or mis-shaped keys; corrupt safetensors; pickle-only checkpoints."""


class ConfigError(MinibtError):
    """config.json names a model type or an option whose maths minibt does not implement."""


class InputError(MinibtError):
    """Inputs the model cannot take: too long, ids outside the vocabulary, mask shape mismatch."""


class BackendError(MinibtError):
    """An attention backend was asked for something it cannot do."""
