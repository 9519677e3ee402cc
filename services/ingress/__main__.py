"""python -m duetserve.services.ingress (DUET_MODEL names the model directory)."""

from duetserve.common.lifecycle import run_service
from duetserve.services.ingress.service import IngressService
from duetserve.services.ingress.settings import SERVICE_NAME, IngressSettings

if __name__ == "__main__":
    settings = IngressSettings()  # DUET_MODEL and the rest come from the environment
    raise SystemExit(run_service(IngressService(settings), settings, SERVICE_NAME))
