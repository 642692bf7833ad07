"""The errors Mneme expects users to meet: one line that names the field and the fix.

They live in the bottom layer (``datamodules``) so that streams, modules and callbacks
raise the same types. The CLI prints a :class:`MnemeError` as ``mneme: error: <message>``
without a traceback and lets every other exception through with its traceback: a bug must
stay visible.
"""


class MnemeError(Exception):
    """An expected failure whose message is one line: ``field: what is wrong; the fix``."""


class ConfigError(MnemeError, ValueError):
    """A configuration value, file or combination that cannot work."""
