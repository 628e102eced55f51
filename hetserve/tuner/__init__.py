"""``hetserve tune``: Bayesian search (optuna TPE) over serving knobs, measured on a real TorchServe.

Seed 004 tunes cores, allocator and OpenMP with SigOpt; this tunes what decides a hetserve
deployment's throughput: TorchServe workers, core-group policy and size (which is also the ORT
intra-op thread count: one pinned thread per core of a group), head groups, spinning,
micro-batch, batchSize, maxBatchDelay, partition ratio, the launcher's memory allocator and its
OpenMP runtime. Objective: the highest offered rate (Poisson arrivals) whose p99 stays under the
target, or the lowest p99 at a given rate.

A trial is an archive variant (`partitioner.archive.with_config`, no re-cut) served by one
TorchServe: registered on the running server over the management API when only model-level knobs
change, a restart when a server-level knob (launcher allocator/OpenMP) changes. Pruning: a
trial's sweep starts at `prune_fraction` x the best rate so far; a trial that cannot sustain even
that is stopped after that one point. The shipped default is trial 0, so the report's gain is
measured against it in the same session.

Small budgets (a handful of trials over a space a brute-force grid covers in a few dozen): every
proposal can first be mapped to its canonical configuration (`canonical`: knobs that cannot
change what runs, such as maxBatchDelay at batchSize 1 or the grouping policy of a one-core
worker, take one fixed value), so no trial re-measures a configuration under another name,
and `search="local"` replaces TPE's random start-up by a coordinate search from the shipped
default: each trial changes one knob of the best configuration so far, in `LOCAL_ORDER` (workers,
maxBatchDelay, ratio, then the rest). With 4-6 trials TPE has no model yet and samples at
random; the default, which sits near the ceiling, is the better prior.

`objective="goodput"` scores a trial by one closed-loop run at `concurrency` clients:
2xx/s x min(1, p99 target / p99), 0 when more than `max_error_rate` fail or nothing succeeds
(`goodput_value`). The score degrades smoothly past the target instead of a 0/1 cliff: with 8
closed-loop clients a 2-core box sits at p99 270-600 ms, so a hard threshold let p99 noise of a
few percent decide between a configuration's full throughput and 0. One measurement per trial,
what a time-boxed comparison against a full grid can afford.

The parts, by concern: ``space`` (knobs, choices, the shipped default), ``settings`` (what a
configuration becomes in model-config.yaml and config.properties), ``canonical`` (one name per
configuration, the grid, the local search's proposals), ``study`` (a trial's measurement and the
optuna study), ``report`` and ``live`` (the harness on a real TorchServe, the ``tune`` and
``--compare`` commands). Everything callers use is importable from ``hetserve.tuner``.
"""

from hetserve.tuner.canonical import (
    LOCAL_ORDER,
    canonical,
    config_key,
    even_topology,
    executor_layout,
    grid_points,
    group_sizes,
    propose_local,
)
from hetserve.tuner.live import LiveHarness, TrialRunner, compare, sample_shape, tune_archive
from hetserve.tuner.report import main_effects, report_markdown, study_report
from hetserve.tuner.settings import Settings, trial_settings, write_winner
from hetserve.tuner.space import (
    ALLOCATOR_FLAGS,
    MODEL_KNOBS,
    SERVER_KNOBS,
    Libraries,
    find_libraries,
    launcher_args,
    launcher_library_dirs,
    search_space,
    shipped_defaults,
    with_defaults,
)
from hetserve.tuner.study import (
    OBJECTIVES,
    PointRunner,
    Prepare,
    TrialFailed,
    TuneOptions,
    goodput_value,
    measure_max_rate,
    measure_trial,
    p99_value,
    run_study,
)

__all__ = [
    "ALLOCATOR_FLAGS", "LOCAL_ORDER", "MODEL_KNOBS", "OBJECTIVES", "SERVER_KNOBS", "Libraries",
    "LiveHarness", "PointRunner", "Prepare", "Settings", "TrialFailed", "TrialRunner", "TuneOptions",
    "canonical", "compare", "config_key", "even_topology", "executor_layout", "find_libraries",
    "goodput_value", "grid_points", "group_sizes", "launcher_args", "launcher_library_dirs",
    "main_effects", "measure_max_rate", "measure_trial", "p99_value", "propose_local",
    "report_markdown", "run_study", "sample_shape", "search_space", "shipped_defaults",
    "study_report", "trial_settings", "tune_archive", "with_defaults", "write_winner",
]
