"""User-facing errors.

Every problem a user can fix (bad path, unknown name, corrupt file, missing CUDA) is raised as
``PrunekitError`` with one sentence naming the problem and what to do. The CLI prints it as a
single line and exits with code 2; everything else is a bug and keeps its traceback.
"""


class PrunekitError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def config_error(key: str, msg: str) -> PrunekitError:
    """A problem at ``key`` of a run config (``stages[1].epochs``), said the same way wherever it is found."""
    return PrunekitError(f"config error at '{key}': {msg}")
