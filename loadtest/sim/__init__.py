"""A discrete-event simulator of Duet units running the scheduler's real planner against a
cost model of each step (see engine.py)."""

from duetserve.loadtest.sim.cost import (
    CostModel,
    CpuProfile,
    FixedCost,
    GpuRooflineProfile,
    StepMeasurement,
    fit_cpu_profile,
    measure_cpu_profile,
)
from duetserve.loadtest.sim.engine import DecisionTimes, Simulation, run_simulation, simulate

__all__ = [
    "CostModel",
    "CpuProfile",
    "DecisionTimes",
    "FixedCost",
    "GpuRooflineProfile",
    "Simulation",
    "StepMeasurement",
    "fit_cpu_profile",
    "measure_cpu_profile",
    "run_simulation",
    "simulate",
]
