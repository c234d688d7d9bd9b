"""The one exception type for expected user errors (bad input, bad config)."""


class FsgEndoError(Exception):
    """An expected error the user can fix: the CLI prints its message as one line and exits 2.

    The message should name the file (or config key) and the problem, e.g.
    ``"data/ann/001-001_12.xml: box (10, 5, 700, 90) leaves the 640x480 frame"``.
    """
