"""The gradient noise scale (McCandlish et al. 2018): estimator math, torch collectors, measurement, critical batch.

- :mod:`~batchlab.noise.estimator`: eq. A.2 and the bias-corrected EMA tracker (plain numbers, no torch);
- :mod:`~batchlab.noise.collectors`: torch hooks that get the two squared gradient norms from a training loop
  (accumulation micro-batches, DDP local vs all-reduced gradients, a split batch), reading them through
  :mod:`~batchlab.noise.backward_norms` (one fused norm per backward);
- :mod:`~batchlab.noise.curvature`: the curvature-aware B_noise = tr(HΣ)/GᵀHG beside B_simple at a checkpoint
  (Hessian-vector products; small models);
- :mod:`~batchlab.noise.measure`: :func:`measure_noise_scale` over a :class:`~batchlab.Workload`, state restored;
- :mod:`~batchlab.noise.critical`: steps-to-target curves and the critical batch fitted to them (pure).

The names below are the ones ``batchlab.noise`` has always exported, plus the measurement's.
"""

from batchlab.noise.collectors import AccumulationCollector, DDPCollector, NormPair, SplitBatchCollector
from batchlab.noise.estimator import (
    DEFAULT_BETA,
    GradientNoiseScale,
    NoiseScaleEstimate,
    check_beta,
    estimate_components,
)
from batchlab.noise.measure import (
    COLLECTORS,
    DEFAULT_NOISE_BATCH,
    DEFAULT_NOISE_STEPS,
    measure_noise_scale,
    measurement_dict,
    noise_batch_for,
    noise_collector,
    require_workload,
)

__all__ = [
    "estimate_components",
    "GradientNoiseScale",
    "NoiseScaleEstimate",
    "NormPair",
    "AccumulationCollector",
    "DDPCollector",
    "SplitBatchCollector",
    "DEFAULT_BETA",
    "measure_noise_scale",
    "noise_collector",
    "noise_batch_for",
    "require_workload",
    "measurement_dict",
    "check_beta",
    "COLLECTORS",
    "DEFAULT_NOISE_STEPS",
    "DEFAULT_NOISE_BATCH",
]
