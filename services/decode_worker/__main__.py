"""python -m duetserve.services.decode_worker"""

import sys

from duetserve.common.lifecycle import run_service
from duetserve.services.decode_worker.service import SERVICE, DecodeWorkerService
from duetserve.services.decode_worker.settings import DecodeSettings


def main() -> int:
    settings = DecodeSettings()
    return run_service(DecodeWorkerService(settings), settings, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
