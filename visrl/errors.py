"""User-facing errors: the one module every part of VisRL raises from.

Each message says what was wrong and what to do. The CLI prints them as one ``Error: ...`` line
with a non-zero exit; the app shows them as a warning. Anything that is not a ``VisRLError`` is a
bug and keeps its traceback.
"""


class VisRLError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, conflicting edit)."""


class ConfigError(VisRLError):
    """A config file or option is invalid (unknown key, bad value, missing field)."""


class DataError(VisRLError):
    """An input record cannot be imported or exported; the message names the record and field."""


class WorkspaceError(VisRLError):
    """The workspace folder or its database is missing or unusable."""


class NotFoundError(VisRLError):
    """A pair, item, job, dataset or checkpoint with that id or name does not exist."""


class ConflictError(VisRLError):
    """Someone else changed the record since it was read (optimistic locking)."""


class ModelError(VisRLError):
    """A model folder, adapter or processor cannot be loaded or is of an unsupported family."""


class RemoteError(VisRLError):
    """An OpenAI-compatible server did not answer usefully after retries."""


class RemoteRefused(RemoteError):
    """The server refused the request (a 4xx such as 401): asking again changes nothing."""


class JobError(VisRLError):
    """A background job cannot be started, stopped or found."""
