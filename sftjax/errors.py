"""The one exception type for mistakes a user can make (bad config, bad data, missing files).

The CLI catches it and prints its message alone, without a traceback, and exits non-zero; anything
else is a bug in sftjax and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says where (file:line or config key) and how."""


class Interrupted(Exception):
    """Training stopped on a signal after the hooks saved what they keep (a checkpoint): a clean,
    resumable stop, exit status 0. Here rather than in train/loop.py so the CLI can catch it without
    importing the training stack first."""
