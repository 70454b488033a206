"""Integrations: batchlab's search inside the trainers people use.

Each module imports its framework lazily (on first use), so ``import batchlab`` never imports Lightning,
Hugging Face or Ultralytics:

- :mod:`batchlab.integrations.ultralytics` -- ``model.train(batch=-1 | 0.7 | 16)`` with batchlab's search;
- :mod:`batchlab.integrations.lightning` -- ``BatchlabFinder``, a drop-in for Lightning's ``BatchSizeFinder``
  that also works under DDP;
- :mod:`batchlab.integrations.hf` -- per-device batch and gradient accumulation for a ``transformers.Trainer``,
  and a drop-in for Accelerate's ``find_executable_batch_size``;
- :mod:`batchlab.integrations.distributed` -- ``find_batch_size_distributed`` under ``torch.distributed``
  (torchrun; DDP and FSDP2, mixed budgets); ``batchlab.integrations.ddp`` is its first import path.

All of them call the public API (:func:`batchlab.find_batch_size`, :func:`batchlab.spec.parse_batch`,
:func:`batchlab.scaling.plan_batch`) and use only their framework's public hooks; see docs/integrations.md.
"""
