"""The one error type of the job's bad-input contract (exit code 2, one line on stderr)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, parameters or output location; the message is one line naming the problem."""


#: What Ray's task errors put before an InputError's own message (their remote traceback comes first).
_MARKER = "InputError: "


def one_line(err: BaseException) -> str:
    """The first line of ``err``'s own message (stripped; after the last ``InputError:`` a wrapping
    Ray error puts before it), or its type's name when the message is empty."""
    text = str(err)
    if _MARKER in text:
        text = text.rsplit(_MARKER, 1)[1]
    lines = text.strip().splitlines()
    return lines[0] if lines else type(err).__name__


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
    return InputError(one_line(exc)) if _MARKER in str(exc) else None
