"""User-facing errors: one line (what, where, how to fix), exit code 2, never a traceback wall."""
from __future__ import annotations

import functools
import sys
import traceback


class UserError(Exception):
    """Bad input the user can fix. The message is the whole story: what, where, how to fix."""


def cli(main):
    """Wrap a stage's main(): a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception:
            from common.ray_setup import verbose

            if verbose():
                raise
            # A real failure: its traceback, and where the Ray workers' output went (not forwarded by default).
            traceback.print_exc()
            print("The Ray workers' own output is in /tmp/ray/session_latest/logs (worker-*.err / *.out); rerun "
                  "with --verbose to see it here.", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
