"""Domain errors. Only the CLI turns these into user-facing messages."""


class LacqError(Exception):
    """Base class for every error lacq reports to the user without a traceback."""


class SourceError(LacqError):
    """The llama.cpp source could not be fetched, verified or prepared."""


class PatchError(SourceError):
    """A patch of the series does not apply."""


class BuildError(LacqError):
    """cmake configure or build failed, or a build is missing."""


class GGUFError(LacqError):
    """A file is not a readable GGUF model."""


class RecipeError(LacqError):
    """A recipe or KV policy is malformed or does not fit the model."""


class ToolError(LacqError):
    """A llama.cpp tool failed; carries the tail of its log."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail

    def __str__(self) -> str:
        base = super().__str__()
        if self.log_tail:
            return f"{base}\nlast lines of its log:\n{self.log_tail}"
        return base


class ImatrixError(LacqError):
    """An importance matrix is not one, does not fit the model or plan, is missing where a type needs one,
    or cannot be made from the text given."""


class OutputExistsError(LacqError):
    """Refusing to overwrite an existing output."""


class StoreError(LacqError):
    """The results database cannot be read or written."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, like KeyboardInterrupt, so that it unwinds the
    same way: a running tool's process group is stopped, temporary outputs are removed and no
    result is stored."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SweepError(LacqError):
    """A sweep file is malformed, or a sweep's executor cannot run."""
