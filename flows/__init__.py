"""Prefect flows of the ReLIFT platform, and the `relift` CLI."""

import os

# The temporary local Prefect server needs ~16 s to start on a 2-core machine, more under load;
# Prefect's default patience (20 s) is too short there.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The local server must not try to phone home: there is no network in CI or on offline hosts.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
