"""The one base class of mistakes a user can fix: a bad recipe value, a missing file or model, a
checkpoint that does not fit. The CLI prints such an error as one message (what was wrong, what
was expected, how to fix it) without a traceback; `--debug` shows the traceback."""


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says how to fix it."""


class LayerError(UserError, ValueError):
    """A read layer outside the model's depth."""


class DataSourceError(UserError, FileNotFoundError):
    """A corpus or data source that cannot be read as configured."""
