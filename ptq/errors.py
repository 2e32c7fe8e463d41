"""The one kind of error a user can fix: bad settings, missing or unreadable files, unsupported models
or formats. Its message is one sentence naming the setting (or file) and the fix; the command line
prints it without a traceback and writes it to ``error.json``. Anything else is a bug and keeps its
traceback."""


class UserError(ValueError):
    """Bad input; the message names the setting and the fix."""
