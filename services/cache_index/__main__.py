"""python -m duetserve.services.cache_index"""

import sys

from duetserve.common.lifecycle import run_service
from duetserve.services.cache_index.service import SERVICE, CacheIndexService
from duetserve.services.cache_index.settings import CacheIndexSettings


def main() -> int:
    settings = CacheIndexSettings()
    return run_service(CacheIndexService(settings), settings, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
