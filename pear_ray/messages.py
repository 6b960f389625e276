"""How an exception is named inside one of our one-line error messages."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (tracebacks and details follow it), or its type when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
