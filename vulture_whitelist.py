"""What vulture reports and is meant: `make lint` runs `vulture src vulture_whitelist.py --min-confidence 60`.

Every name here is used from outside the package's own code, which vulture cannot see. A new report that is not
one of these kinds is dead code: delete it rather than list it.
"""
# ruff: noqa: F821, B018 -- names for vulture to read, not code to run

# Result fields users read (dataclass fields; the JSON carries them): FitResult, MemoryBreakdown, the advice,
# the schedule, the critical-batch window, the profile, the sweep's config.
state_copy_bytes, state_copy_storage, device_settings  # FitResult
activations, temporaries, allocator_overhead, cuda_workspace, other  # MemoryBreakdown
current_goodput  # Recommendation
per_rank_batch, samples_per_rank, last_batch_size, last_step_micro_batches  # Schedule
total_iterations, total_samples, padded_samples, dropped_samples  # Schedule
first_step, last_step  # the critical-batch window
loader_step_seconds, best_samples_per_second  # ProfilePoint, VariantSummary
workload_options, batch_sizes_spec  # SweepConfig (its identity for resume)
MAX  # TargetMode.MAX, chosen by value from a user's target
_.memory_line  # PlanResult.memory_line, passed to find_batch_size(estimate=...)
_.single_micro_batch_steps  # the accumulation collector's count, read by users and tests
_.unmeasured_steps  # the accumulation collector's count of steps shorter than the one before
_.skipped_steps  # the accumulation collector's count of steps left out by every=k
b_noise_stderr, g_h_g, trace_h_sigma  # CurvatureNoiseScale fields, read by benchmarks/critical_branch.py
b_preconditioned, b_preconditioned_stderr  # ditto

# What an integration leaves on the framework's object for the user (documented in each integration).
_.batchlab_result, _.ultralytics_batch, _.optimal_batch_size

# Hooks a framework calls by name, with the signatures it calls them with.
_.setup, _.on_fit_start  # Lightning Callback
_.on_train_start, _.on_before_optimizer_step, _.on_train_batch_end  # ditto
_.on_train_epoch_start, _.teardown  # ditto
_.on_trial_start, _.on_trial_result, iteration, trials  # Ray Tune Callback
_._num_to_string, vmin, vmax  # matplotlib LogFormatter's text hook
types  # TorchDispatchMode.__torch_dispatch__(func, types, args, kwargs)

# GradScaler's lazily created growth tracker, reset with its scale (workload/state.py, _GradScalerCopy).
_._growth_tracker

# Issue 12's building blocks, called by users, the tests and benchmarks/token_budget.py (outside src/): the token
# budget, the sampler and collator a DataLoader takes, the text dataset, the callback's evaluation answer.
token_budget, _.batch_size_at, _.lhotse_buckets, limiting_length  # batchlab.fit.tokens
_.from_budget, _.set_epoch, PadCollator  # batchlab.training.sampler (set_epoch: as DistributedSampler's)
DocumentDataset  # batchlab.workloads.text
_.eval_batch_size  # BatchlabFinder, with eval_batch_arg_name
# The shape table's public mapping (issue 12): what a token budget is computed from, by the user or batchlab.
_.max_batch_by_shape
_.batchlab_shape_table  # set on the Ultralytics trainer for the user to read after training
# The fixed batches' trade-off curve read at given steps (issue 13 item 3): benchmarks/batch_ramp.py's --curve.
_.samples_at_steps  # batchlab.noise.critical.CriticalBatchFit
