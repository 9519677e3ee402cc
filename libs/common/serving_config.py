"""`DUET_MODE=auto` and `DUET_DTYPE=auto`: the configuration measured best on this kind of device.

`measured_configs.json` beside this file is the committed table: for each kind of device, the
goodput that each mode and dtype gave on the same workload, in one run
(`python -m duetserve.loadtest.autotune`, which also writes the table in docs/benchmarks.md).
`choose` picks from it deterministically: the row with the highest goodput among those that
match what the settings fix (a mode or dtype set by hand is kept), ties broken by SLO
attainment and then by the table's order. A mode set by hand that was never measured gets the
dtype that measured best on the device in any mode. A device kind with no row keeps the
design's default (semi-pd), in bfloat16 on a GPU and float32 on a CPU, until a measurement
says otherwise.

Device kinds: `cpu`, or `cuda` when the NVIDIA kernel driver lists a GPU (read from /proc: no
CUDA call, so any process, with or without torch, resolves `auto` the same way). Every process
of a unit must see the same device for `auto` to agree; the launcher resolves it once and
passes the concrete values to the services it starts.
"""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, cast, get_args

Mode = Literal["semi-pd", "unified", "disagg"]
Dtype = Literal["float32", "bfloat16", "float16"]
DeviceKind = Literal["cpu", "cuda"]
AUTO = "auto"

TABLE_PATH = Path(__file__).with_name("measured_configs.json")
FALLBACK_MODE: Mode = "semi-pd"  # DESIGN.md's default where nothing was measured
FALLBACK_DTYPE: dict[DeviceKind, Dtype] = {"cuda": "bfloat16", "cpu": "float32"}


@dataclass(frozen=True, slots=True)
class MeasuredConfig:
    """One configuration's result in the committed table."""

    device: DeviceKind
    mode: Mode
    dtype: Dtype
    threads: str  # how the cores or SMs were laid out, as measured
    goodput: float  # requests/s within SLO, averaged over the measured rates
    attainment: float  # fraction of requests within SLO, averaged likewise

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "MeasuredConfig":
        if row["mode"] not in get_args(Mode) or row["dtype"] not in get_args(Dtype):
            raise ValueError(f"{TABLE_PATH.name}: unknown mode or dtype in {row}")
        if row["device"] not in get_args(DeviceKind):
            raise ValueError(f"{TABLE_PATH.name}: unknown device kind in {row}")
        return cls(
            row["device"],
            row["mode"],
            row["dtype"],
            str(row["threads"]),
            float(row["goodput"]),
            float(row["attainment"]),
        )


@dataclass(frozen=True, slots=True)
class Choice:
    mode: Mode
    dtype: Dtype
    reason: str  # one line for the start-up log


@cache
def measured_table(path: Path = TABLE_PATH) -> tuple[MeasuredConfig, ...]:
    data = json.loads(path.read_text())
    return tuple(MeasuredConfig.from_json(row) for row in data["rows"])


def detect_device(proc_root: Path = Path("/proc")) -> DeviceKind:
    """`cuda` when the NVIDIA kernel driver lists a GPU, else `cpu`."""
    try:
        return "cuda" if any((proc_root / "driver" / "nvidia" / "gpus").iterdir()) else "cpu"
    except OSError:
        return "cpu"


def choose(
    mode: str,
    dtype: str,
    device: DeviceKind,
    table: tuple[MeasuredConfig, ...] | None = None,
) -> Choice:
    """The concrete mode and dtype for settings that may say `auto` (see the module doc)."""
    if mode != AUTO and dtype != AUTO:
        return Choice(cast(Mode, mode), cast(Dtype, dtype), "set by DUET_MODE and DUET_DTYPE")
    table_rows = measured_table() if table is None else table
    rows = [
        row
        for row in table_rows
        if row.device == device and mode in (AUTO, row.mode) and dtype in (AUTO, row.dtype)
    ]
    if not rows:
        picked_mode = FALLBACK_MODE if mode == AUTO else cast(Mode, mode)
        picked_dtype = cast(Dtype, dtype)
        if dtype == AUTO:  # the dtype that measured best on this device in any mode, if any
            device_rows = [r for r in table_rows if r.device == device]
            best_any = max(device_rows, key=lambda r: (r.goodput, r.attainment), default=None)
            picked_dtype = FALLBACK_DTYPE[device] if best_any is None else best_any.dtype
        return Choice(
            picked_mode,
            picked_dtype,
            f"no measurement for {device} with mode={mode} dtype={dtype} in "
            f"{TABLE_PATH.name}: the design's default",
        )
    # max() keeps the first of equal keys: the table's order breaks exact ties.
    best = max(rows, key=lambda row: (row.goodput, row.attainment))
    return Choice(
        best.mode,
        best.dtype,
        f"measured best on {device}: {best.goodput:.2f} req/s within SLO "
        f"({best.attainment:.0%} attainment; {best.threads}) among {len(rows)} measured "
        f"configuration(s), see docs/benchmarks.md",
    )


def resolve_auto_fields(data: Any) -> Any:
    """A settings model's before-validator: `mode` and `dtype` given as `auto` (or not given:
    auto is the default) become the measured best for this device."""
    if not isinstance(data, dict):
        return data
    mode, dtype = str(data.get("mode", AUTO)), str(data.get("dtype", AUTO))
    if AUTO not in (mode, dtype):
        return data
    picked = choose(mode, dtype, detect_device())
    return {**data, "mode": picked.mode, "dtype": picked.dtype, "auto_choice": picked.reason}
