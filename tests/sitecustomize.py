"""Run by every Python interpreter that starts with tests/ on its PYTHONPATH: only the Ray
workers of a test cluster (`slowdown.worker_env`), which install the test slowdowns there.
Not a runtime env hook: a job-level runtime env makes Ray start a fresh worker for every task
and actor instead of its prestarted ones (seconds per job)."""

import os
import sys

if os.environ.get("SLOWDOWN_FILE") and sys.argv and sys.argv[0].endswith("default_worker.py"):
    import slowdown

    slowdown.install()
