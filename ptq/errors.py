"""The one kind of error a user can fix: bad settings, missing or unreadable files, unsupported models
or formats. Its message is one sentence naming the setting (or file) and the fix; the command line
prints it without a traceback and writes it to ``error.json``. Anything else is a bug and keeps its
traceback."""

import errno
from contextlib import contextmanager


class UserError(ValueError):
    """Bad input; the message names the setting and the fix."""


class DiskFullError(UserError, OSError):
    """The disk filled (or the quota ran out) while ptq wrote a file."""


@contextmanager
def disk_space_for(path):
    """Turn "no space left" while writing ``path`` into one sentence naming the folder and the fix."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(
            f"no space left on the disk while writing {path}: free space there, or set output_dir to a disk with "
            "room (finished blocks stay in output_dir/progress/, so resume=true continues)"
        ) from None
