"""A helper worker of `mobiletune sweep --workers N`: more trials of the same study, in a process of its own.

Started by `helpers.local` with its task (JSON) in the environment variable MOBILETUNE_WORKER. It runs
trials until the study holds its trials, then stops; the worker that started it chooses and makes best/.
"""

from __future__ import annotations

import json
import os
import sys

from mobiletune.tuning.setup import WORKER_TASK as TASK


def main() -> int:
    if TASK not in os.environ:  # before TensorFlow's start-up: one line at once
        print("error: mobiletune.tuning.worker is started by `mobiletune sweep --workers N`, not by hand",
              file=sys.stderr)
        return 2
    from mobiletune.errors import MobiletuneError
    from mobiletune.quiet import import_tensorflow

    import_tensorflow()
    from mobiletune.tuning.search import run_helper

    try:
        run_helper(json.loads(os.environ[TASK]), say=lambda *a, **k: print(*a, flush=True))
    except MobiletuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C reaches every worker of the terminal: said once, by the first
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
