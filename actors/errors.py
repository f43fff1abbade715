"""The one exception type for a user's mistake.

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's flags, files or model, named in ``where``.

    Args:
        where: the flag, field or file at fault, e.g. ``--input`` or ``data.csv``.
        message: what is wrong and, where useful, how to fix it.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions raised in tasks; keep both arguments across the trip.
        return (type(self), (self.where, self.message))


def find_user_error(exc: BaseException) -> UserError | None:
    """Walk the cause chain (Ray wraps task errors) to a UserError, if one is there."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None
