"""User-facing errors. The CLI prints their message and exits with status 2, no traceback."""


class HybridSeqError(Exception):
    """Any error caused by the user's input (a config, a path, an argument)."""


class ConfigError(HybridSeqError, ValueError):
    """A layout/config file is malformed. The message names the file, the key and, for layout
    patterns, the column with a caret under it."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        where = []
        if file:
            where.append(str(file))
        if key:
            where.append(f"key '{key}'")
        prefix = (": ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.bare_message = message
