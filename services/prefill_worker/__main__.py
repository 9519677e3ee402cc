"""python -m duetserve.services.prefill_worker"""

import sys

from duetserve.common.lifecycle import run_service
from duetserve.services.prefill_worker.service import SERVICE, PrefillWorkerService
from duetserve.services.prefill_worker.settings import PrefillSettings


def main() -> int:
    settings = PrefillSettings()
    return run_service(PrefillWorkerService(settings), settings, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
