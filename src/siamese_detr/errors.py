"""The package's user-facing errors (the ground floor: imports nothing of ours).

Both are printed by the command line as one line naming the file or key and the fix, with a
non-zero exit, never as a traceback. Library code raises them; only ``cli/`` catches them.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(Exception):
    """A mistake the user can fix (a bad path, argument or file); printed as a single line."""


class ConfigError(ValueError):
    """A user-facing configuration mistake (one line, names the key and the fix)."""
