"""The environment a worker process starts with: set by the supervisor (``server/workers.py``),
read in the worker (its CLI, its diagnostic logs: ``logs.py``, its ``POST /reload``).

On the data floor, so that ``logs`` can tag a worker's lines without importing ``server/``.
"""

from __future__ import annotations

ENV_WORKER = "MTLSPROXY_WORKER"  # set in a worker's environment to its index
ENV_SUPERVISOR = "MTLSPROXY_SUPERVISOR_PID"  # and the supervisor it may signal
