"""The one line between a user's mistake and a bug.

`UserError` is everything a user can fix (a bad image, a name, a setting, a file of another model
family): front ends print its message as one line and stop. Anything else (a shape bug, out of
memory) is not caught by them and keeps its traceback. Kept free of torch so front ends import it
cheaply.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message says how, in one sentence."""


class OutputExistsError(UserError, FileExistsError):
    """An output file of that name exists and overwriting was not asked for."""


class MissingFileError(UserError, FileNotFoundError):
    """An input file or folder the user named does not exist."""
