"""python -m duetserve.services.decode_worker"""

import logging
import sys

from duetserve.common.lifecycle import run_service
from duetserve.common.logs import setup_logging
from duetserve.services.decode_worker.service import SERVICE, DecodeWorkerService
from duetserve.services.decode_worker.settings import DecodeSettings


def main() -> int:
    settings = DecodeSettings()
    if settings.mode == "unified":
        # Started anyway (docker-compose starts every service): nothing to run, not a failure.
        setup_logging(SERVICE, settings.log_level, settings.log_format)
        how = settings.auto_choice or "set by DUET_MODE"
        logging.getLogger(SERVICE).info(
            "DUET_MODE=unified (%s): the prefill worker decodes; no decode worker is needed", how
        )
        return 0
    return run_service(DecodeWorkerService(settings), settings, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
