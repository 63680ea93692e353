"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A data set, file or setting the user must fix; the CLI prints it without a traceback.

    Every message names the offending path, member, key or value, so the user can act on it alone.
    """
