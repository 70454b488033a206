"""Advice: the batch size and learning rate that reach a result soonest (goodput), and how to run them.

Modules, one job each, pure math first:

- :mod:`~batchlab.advice.scaling`: learning-rate rules, accumulation plans, epoch/iteration arithmetic;
- :mod:`~batchlab.advice.transfer`: :func:`carry_hyperparameters`, the hyper-parameters across a batch change;
- :mod:`~batchlab.advice.ramp`: :class:`RampRule`, when a batch ramp grows (sizes and hysteresis);
- :mod:`~batchlab.advice.goodput`: statistical efficiency, goodput, steps to a result over a throughput curve;
- :mod:`~batchlab.advice.recommend`: :func:`recommend`, the recommendation from a curve and a noise scale;
- :mod:`~batchlab.advice.pipeline`: :func:`advise`, which measures what fits, throughput and the noise scale
  on a Workload and recommends -- what ``batchlab advise`` prints.
"""

from batchlab.advice.goodput import (
    doubling_step_reduction,
    goodput,
    interpolate_throughput,
    statistical_efficiency,
    steps_factor,
)
from batchlab.advice.pipeline import Advice, advise, rule_for
from batchlab.advice.ramp import RampRule, ramp_sizes
from batchlab.advice.recommend import recommend
from batchlab.advice.records import Candidate, Recommendation
from batchlab.advice.scaling import RULES, BatchPlan, LRScaling, Schedule, plan_batch, scale_lr, schedule
from batchlab.advice.transfer import CarryOver, carry_hyperparameters

__all__ = [
    "Advice",
    "BatchPlan",
    "Candidate",
    "CarryOver",
    "LRScaling",
    "RULES",
    "RampRule",
    "Recommendation",
    "Schedule",
    "advise",
    "carry_hyperparameters",
    "doubling_step_reduction",
    "goodput",
    "interpolate_throughput",
    "plan_batch",
    "ramp_sizes",
    "recommend",
    "rule_for",
    "scale_lr",
    "schedule",
    "statistical_efficiency",
    "steps_factor",
]
