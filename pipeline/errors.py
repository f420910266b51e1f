"""User-facing errors: one clear line, exit code 2, no stack trace (see pipeline.cli)."""


class UserError(Exception):
    """A mistake in what the user gave us (recipe key, data file, checkpoint, CLI flag).

    The message must name *what* is wrong and *where* (file, key path, line) in one line.
    """

    exit_code = 2


class NonFiniteError(UserError):
    """The loss or the gradients became NaN / inf (a diverging run): one line naming the step and the budget.

    Exit code 3 tells it apart from bad input; the last checkpoint is left as it was."""

    exit_code = 3
