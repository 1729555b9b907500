"""Calibration: a :class:`~dit_accel.SparsePlan` per layer, head and step, searched on the user's own model.

Its own room above :mod:`dit_accel.eval`: it uses :mod:`dit_accel.pipelines` to sample q/k/v and
run plans, and :mod:`dit_accel.kernels.cost` for what candidates cost; nothing below imports it.

- :mod:`.candidates`: the method configs scored (every pattern method over a small grid, plus dense);
- :mod:`.sampling`: step buckets and the bounded in-memory q/k/v sample of the dense run;
- :mod:`.scoring`: each candidate's per-head error against dense attention;
- :mod:`.costs`: per-head and per-launch modelled GPU time;
- :mod:`.search`: the Lagrangian allocation and the plan it makes;
- :mod:`.replay`: the dense run's transformer outputs, read back for a plan's leading dense steps;
- :mod:`.report`: ``report.md`` and the heatmap; :mod:`.settings`: what a calibration runs and may spend;
  :mod:`.run`: the whole calibration.

Example::

    from dit_accel.calibrate import CalibrationSettings, calibrate
    calibrate(CalibrationSettings("tiny-shapes", prompts, min_psnr=30), "plan.json")
"""

from .run import CalibrationSettings, calibrate

__all__ = ["CalibrationSettings", "calibrate"]
