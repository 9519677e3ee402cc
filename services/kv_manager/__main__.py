"""python -m duetserve.services.kv_manager (DUET_MODEL names the checkpoint directory)"""

import sys

from duetserve.common.lifecycle import run_service
from duetserve.services.kv_manager.service import SERVICE, KVManagerService
from duetserve.services.kv_manager.settings import KVManagerSettings


def main() -> int:
    settings = KVManagerSettings()  # DUET_MODEL and the rest come from the environment
    return run_service(KVManagerService(settings), settings, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
