"""python -m duetserve.services.scheduler"""

import sys

from duetserve.common.lifecycle import run_service
from duetserve.services.scheduler.service import SERVICE, SchedulerService
from duetserve.services.scheduler.settings import SchedulerSettings


def main() -> int:
    settings = SchedulerSettings()
    return run_service(SchedulerService(settings), settings, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
