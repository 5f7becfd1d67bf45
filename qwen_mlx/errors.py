"""The one exception type for user mistakes: a bad path, a wrong config, an unsupported option."""

from __future__ import annotations


class QwenMLXError(Exception):
    """A problem the user can fix. The message names the file or value and says how to fix it.

    `field` names the request argument at fault (`"top_p"`, `"max_tokens"`, `"prompt"`), when one is: the HTTP
    server reports it as the error's `param`. The CLI prints the message as one line and exits 2; anything else that
    escapes is a bug and keeps its traceback.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
