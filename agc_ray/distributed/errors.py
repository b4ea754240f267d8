"""The one error type of the job's bad-input contract (exit code 2, one line on stderr)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, parameters or output location; the message is one line naming the problem."""


def one_line(err: BaseException) -> str:
    """The first line of ``err``'s message (stripped), or its type's name when the message is empty."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def find_input_error(exc: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``exc`` (Ray wraps errors raised in tasks and Ray Data UDFs)."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, InputError):
            return e
        for attr in ("cause", "__cause__", "__context__"):
            stack.append(getattr(e, attr, None))
        for arg in getattr(e, "args", ()):
            if isinstance(arg, BaseException):
                stack.append(arg)
    text = str(exc)
    marker = "InputError: "
    if marker in text:
        return InputError(text.split(marker, 1)[1].strip().splitlines()[0])
    return None
