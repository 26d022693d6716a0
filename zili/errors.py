"""User errors: what the user got wrong and how to fix it.

The CLI catches `UserError` and prints one line, `error: <message>`, then exits with code 2 and no
traceback. Raise it for bad configs, missing files, incompatible checkpoints and impossible layouts;
let genuine bugs raise ordinary exceptions.
"""


class UserError(Exception):
    """A mistake in the user's input. The message says what is wrong — and how to fix it."""
