"""User-facing errors: one line that names the problem and the fix.

The command line prints these as ``erasekit: error: <message>`` and exits with
status 2. Library users catch :class:`ErasekitError`.
"""


class ErasekitError(Exception):
    """A problem with what the user asked for (bad input), not a bug in erasekit."""
