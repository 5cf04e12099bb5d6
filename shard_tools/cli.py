"""The one place where errors become exit codes: every CLI entry point runs through `run_main`."""
from __future__ import annotations

import sys
from typing import Callable

from shard_tools.errors import Error, one_line
from shard_tools.redaction import redact


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Run `main`; an `Error` is printed as `prog: error: MESSAGE` (credentials redacted) and becomes its exit code.
    Anything else is a bug and keeps its traceback."""
    try:
        return main()
    except Error as e:
        print(f"{prog}: error: {redact(one_line(e, limit=2000))}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
