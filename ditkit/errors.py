"""One exception type for every bad input a user can give us.

The CLI turns a `DitkitError` into one clear line on stderr and exit code 2 (usage) or 1 (runtime);
the HTTP server turns it into a 4xx. Messages name what was wrong and what is allowed.
"""


class DitkitError(Exception):
    """A user-facing error: bad flag, bad file, bad value. `exit_code` is what the CLI returns."""

    exit_code = 1


class UsageError(DitkitError):
    """A bad flag or value: the CLI exits with code 2, like argparse."""

    exit_code = 2
