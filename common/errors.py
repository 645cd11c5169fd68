"""User-facing errors and exit codes, the same for every stage script:

- 0: done (or a complete output reused);
- 2: bad input the user can fix (a UserError, raised on the driver or inside a Ray task/actor): one `error:` line
  on stderr (what, where, how to fix), no traceback, and nothing written;
- 1: a failure of the run itself (a crash in Ray, vLLM, torch, ...): its traceback, then a last `error:` line with
  the root cause and where the Ray workers' logs are (`--verbose` shows them, and re-raises as is: also exit 1).
"""
from __future__ import annotations

import functools
import sys
import traceback

RAY_LOGS = "/tmp/ray/session_latest/logs"


class UserError(Exception):
    """Bad input the user can fix. The message is the whole story: what, where, how to fix."""


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception: Ray wraps a task's error (`.cause`), libraries chain theirs (`__cause__`)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    return e


def cli(main):
    """Wrap a stage's main(): a UserError becomes one line on stderr and exit code 2, anything else exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:
            cause = root_cause(e)
            if isinstance(cause, UserError):  # raised inside a Ray task or actor: still bad input
                print(f"error: {cause}", file=sys.stderr, flush=True)
                sys.exit(2)
            from common.ray_setup import verbose

            if verbose():
                raise
            # A real failure: its traceback, and where the Ray workers' output went (not forwarded by default).
            traceback.print_exc()
            what = (str(cause).strip().splitlines() or [""])[0][:300]
            print(f"error: the run failed (not your input, exit 1): {type(cause).__name__}: {what}; the traceback "
                  f"is above, the Ray workers' own output in {RAY_LOGS} (worker-*.err / *.out); rerun with "
                  f"--verbose to see it here", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
