"""The defaults more than one part of batchlab uses, each once, with its reason and source.

A default used by one module only lives there, beside the code it shapes; the ones here are shared by the
search, the profile, the advice and the sweep, so that they cannot drift apart.
"""

from __future__ import annotations

# Why 0.90 and not Ultralytics' 0.60: batchlab *verifies* its answer with real steps of the whole training step
# (optimizer state and all), so the margin no longer has to absorb extrapolation error -- only allocator
# fragmentation over a long run and variation in input size (padding, augmentation). Ultralytics extrapolates
# from forward+backward probes and needs the slack; its users call 0.60 too conservative (ultralytics#1659).
DEFAULT_FRACTION = 0.90

# Every probe runs two full steps: the first creates the optimizer state (Adam's moments: 2x the parameters),
# the second runs with it -- the peak the user's run reaches from its second step on.
VERIFY_STEPS = 2

# Steps left out of every timing: step 1 creates gradients and optimizer state (and on CUDA autotunes cuDNN and
# warms the allocator); step 2 is the first update with optimizer state present. Neither is a steady step.
WARMUP_STEPS = 2

# The knee of throughput: the smallest batch reaching 95% of the best samples/s -- the last 5% of speed is
# rarely worth a batch several times larger (Google's Tuning Playbook: only sizes up to maximum throughput count).
KNEE_THRESHOLD = 0.95

# Pollux/AdaptDL re-configure a job only when the new configuration's goodput is > 5% better: smaller gains
# are within the noise of the measurements and not worth a change (Qiao et al. 2021, section 4.2).
GAIN_THRESHOLD = 0.05

# The largest micro-batch profile and advise measure unless max_batch_size says otherwise (fit keeps batch=-1's
# "largest that fits"). A small model with no dataset size fits 10^7-10^8 samples in a CPU's RAM, and searching
# and timing up there took minutes (a 2-layer MLP on 8 inputs: `batchlab fit` 2.6 min to 93.6M; advise did not
# finish in 6.5). Nothing is lost up there: that MLP's samples/s rose 12% from 32,768 to 65,536 and fell 3% to
# 131,072, as a saturated device does, while past B_noise (59-3,000 on every workload measured here) each doubling
# of the batch halves the statistical efficiency (McCandlish et al. 2018): no micro-batch above 2^16 can have
# more goodput than 2^16 itself.
MEASURED_MAX_BATCH = 2**16

# Under torchrun, the bound on every collective of a probe (find_batch_size_distributed) or an OOMGuard step,
# instead of the process group's own (30 min for gloo, 10 min for nccl): a rank that fails inside a collective
# the others already wait in would otherwise hold them that long. 300 s is torchtitan's bound for the first
# collectives, communicator set-up included (``comm.init_timeout_seconds``; ``train_timeout_seconds``, 100 s,
# for later steps): long enough for a slow rank's step, short enough to fail a job in minutes.
COLLECTIVE_TIMEOUT_S = 300.0
