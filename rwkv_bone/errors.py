"""One exception type for mistakes a user can make (bad path, wrong shape, bad flag).

Library code raises `UserError` with one sentence that names the problem and the fix; the
command-line entry points catch it, print that sentence and exit non-zero (see `rwkv_bone.cli`).
Library code never calls sys.exit.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one clear sentence (no traceback)."""
