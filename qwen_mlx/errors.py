"""The one exception type for user mistakes: a bad path, a wrong config, an unsupported option."""


class QwenMLXError(Exception):
    """A problem the user can fix. The message names the file or value and says how to fix it.

    The CLI prints it as one line and exits 2; anything else that escapes is a bug and keeps its traceback.
    """
