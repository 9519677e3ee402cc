"""python -m duetserve.services.launcher: the whole stack on this machine (`make run`)."""

import asyncio
import signal
import sys
from pathlib import Path

from duetserve.common.logs import setup_logging
from duetserve.services.launcher.launcher import Launcher
from duetserve.services.launcher.settings import LauncherSettings


def default_model(settings: LauncherSettings) -> Path:
    """DUET_MODEL, or the tiny model, generated once under models/tiny."""
    if settings.model is not None:
        return settings.model
    tiny = settings.models_dir / "tiny"
    if not (tiny / "config.json").exists():
        from duetserve.runtime.generator.build import write_model
        from duetserve.runtime.generator.spec import PRESETS

        write_model(PRESETS["tiny"], tiny)
    return tiny


async def serve(launcher: Launcher) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await launcher.start()
    assert launcher.nats is not None
    print(f"NATS on {launcher.nats.url}", flush=True)
    print(f"Duet is serving on http://127.0.0.1:{launcher.settings.port}/v1", flush=True)
    await stop.wait()


def main() -> int:
    settings = LauncherSettings()
    setup_logging("launcher", settings.log_level, "text")
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
