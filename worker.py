"""`python worker.py`: a Temporal worker with the Tardigrade plugin, for a checkout.

Installed, the same worker is `tardigrade worker`; both take --address, --task-queue and --namespace.
"""

import sys

from tardigrade.cli import run

if __name__ == "__main__":
    sys.argv[1:1] = ["worker"]
    run()
