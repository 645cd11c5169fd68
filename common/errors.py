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


def _chain(e: BaseException):
    """e, then what it wraps: Ray keeps a task's error as `.cause`, libraries chain theirs as `__cause__`."""
    seen = set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of the chain."""
    return list(_chain(e))[-1]


def user_error(e: BaseException) -> UserError | None:
    """The UserError in the chain itself (not Ray's wrapper of one, whose message holds the task's traceback)."""
    return next((x for x in _chain(e) if isinstance(x, UserError)
                 and not isinstance(getattr(x, "cause", None), BaseException)), None)


def cli(main):
    """Wrap a stage's main(): a UserError becomes one line on stderr and exit code 2, anything else exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:
            # Raised inside a Ray task or actor, a UserError arrives wrapped (its message then holds the task's
            # traceback): its cause is the one line, and it is still bad input.
            if (bad := user_error(e)) is not None:
                print(f"error: {bad}", file=sys.stderr, flush=True)
                sys.exit(2)
            from common.ray_setup import verbose

            if verbose():
                raise
            # A real failure: its traceback, and where the Ray workers' output went (not forwarded by default).
            traceback.print_exc()
            cause = root_cause(e)
            what = (str(cause).strip().splitlines() or [""])[0][:300]
            print(f"error: the run failed (not your input, exit 1): {type(cause).__name__}: {what}; the traceback "
                  f"is above, the Ray workers' own output in {RAY_LOGS} (worker-*.err / *.out); rerun with "
                  f"--verbose to see it here", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper
