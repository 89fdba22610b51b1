"""Work beyond one process: sweeps of independent jobs, and Ray when it is asked for."""

from .sweep import Job, JobFailed, Sweep, SweepOutcome, options_argv, run_engram, run_sweep

__all__ = ["Job", "JobFailed", "Sweep", "SweepOutcome", "options_argv", "run_engram",
           "run_sweep"]
