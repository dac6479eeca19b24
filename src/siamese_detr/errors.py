"""The package's user-facing errors (the ground floor: imports nothing of ours).

Both are printed by the command line as one line naming the file or key and the fix, with a
non-zero exit, never as a traceback. Library code raises them; only ``cli/`` catches them.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "RunStopped", "UserError"]

#: exit status of a run stopped by a signal with its checkpoint saved (EX_TEMPFAIL: "try
#: again"); SLURM requeue scripts test for it.
EXIT_STOPPED = 75


class UserError(Exception):
    """A mistake the user can fix (a bad path, argument or file); printed as a single line."""


class ConfigError(ValueError):
    """A user-facing configuration mistake (one line, names the key and the fix)."""


class DataError(UserError):
    """The data cannot train (no usable sample, every box invalid, a mismatched store)."""


class RunStopped(Exception):  # noqa: N818  (a state, not a failure)
    """A training run stopped before its last step with a checkpoint saved (SIGTERM/SIGUSR1,
    or too many non-finite losses); the command line prints how to resume and exits
    ``EXIT_STOPPED``."""

    exit_code = EXIT_STOPPED

    def __init__(self, step: int, total: int, checkpoint: str, reason: str = "") -> None:
        super().__init__(f"stopped at step {step} of {total}"
                         + (f" ({reason})" if reason else "") + f"; checkpoint saved: "
                         f"{checkpoint}")
        self.step, self.total, self.checkpoint, self.reason = step, total, checkpoint, reason
