"""The tuner: search space, settings it writes, pruning and the report (with a synthetic server
whose capacity is a known function of the knobs), plus one tiny live trial on a real TorchServe."""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path

import pytest
import yaml

from handlers.runtime.config import RuntimeConfig
from hetserve.knee import Criteria
from hetserve.loadgen import LatencyStats, LoadResult
from hetserve.properties import merge_properties, read_properties
from hetserve.tuner import (
    Libraries,
    LiveHarness,
    TrialFailed,
    TrialRunner,
    TuneOptions,
    canonical,
    config_key,
    find_libraries,
    goodput_value,
    grid_points,
    group_sizes,
    launcher_args,
    main_effects,
    measure_max_rate,
    propose_local,
    report_markdown,
    run_study,
    search_space,
    shipped_defaults,
    study_report,
    trial_settings,
    with_defaults,
    write_winner,
)
from partitioner.auto_workers import resolve

REPO = Path(__file__).resolve().parent.parent
NO_LIBS = Libraries((), False)


def fake_result(rate: float, capacity: float) -> LoadResult:
    """What an open-loop run against a server of `capacity` req/s looks like."""
    ok = rate < capacity
    served = min(rate, capacity)
    p99 = 40.0 if ok else 4000.0
    stats = LatencyStats(int(rate * 4), p99 / 2, p99 / 2, p99, p99, p99)
    return LoadResult("open", rate, None, "poisson", 4.0, 1.0, int(rate * 4), int(rate * 4), int(served * 4),
                      int(served * 4), served, served, 0.0, stats, stats, {}, 0.1, 0.2, 0.0, 0.0, 2)


def capacity_of(params) -> float:
    """Synthetic server: batchSize and workers matter, jemalloc a little, spinning not at all."""
    return 10.0 * params["workers"] * (1 + math.log2(params["batchSize"])) + (4 if params["allocator"] == "jemalloc" else 0)


def fake_prepare(calls: list):
    @contextlib.contextmanager
    def prepare(params):
        calls.append([])

        def at(rate):
            calls[-1].append(rate)
            return fake_result(rate, capacity_of(params))

        yield at
    return prepare


def shipped():
    # minWorkers: auto as it resolves on a 2-core box (2 workers), the size the spaces below use
    config, _ = resolve(yaml.safe_load((REPO / "config" / "model-config.yaml").read_text()), 2, 0)
    props = read_properties(REPO / "config" / "config.properties")
    return shipped_defaults(config, 0.8, props)


def test_shipped_defaults_are_the_repository_configs():
    d = shipped()
    assert d["workers"] == 2 and d["batchSize"] == 4 and d["maxBatchDelay"] == 5
    assert d["core_groups"] == "numa" and d["ratio"] == 0.8 and d["spinning"] is False
    assert d["allocator"] == "default" and d["openmp"] == "gnu"  # --use-default-allocator --disable-iomp


def test_shipped_workers_read_the_resolved_int_and_derive_auto_on_this_box():
    # an archive holds minWorkers resolved to an int; an unresolved "auto" means this box's count
    from handlers.hardware.topology import default_workers
    from partitioner.auto_workers import box

    assert shipped_defaults({"minWorkers": 2}, 0.8, {})["workers"] == 2
    assert shipped_defaults({"minWorkers": "2"}, 0.8, {})["workers"] == 2
    assert shipped_defaults({"minWorkers": "auto"}, 0.8, {})["workers"] == default_workers(*box())
    assert shipped_defaults({}, 0.8, {})["workers"] == 1


def test_space_scales_with_the_machine_and_offers_only_libraries_found():
    small = search_space(2, [0.5, 0.8], NO_LIBS)
    assert small["workers"] == (1, 2)
    assert small["core_groups"] == ("numa", "socket", "size:1")
    assert small["allocator"] == ("default",) and small["openmp"] == ("gnu",)
    assert small["ratio"] == (0.5, 0.8, 1.0)
    big = search_space(16, [0.8], Libraries(("jemalloc", "tcmalloc"), True))
    assert big["workers"] == (1, 2, 4)
    assert "size:8" in big["core_groups"] and "size:16" not in big["core_groups"]
    assert big["allocator"] == ("default", "jemalloc", "tcmalloc") and big["openmp"] == ("gnu", "intel")
    assert with_defaults(small, {"batchSize": 3})["batchSize"][-1] == 3


def test_libraries_are_looked_up_where_the_launcher_looks(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libjemalloc.so").write_bytes(b"")
    libs = find_libraries({"VIRTUAL_ENV": str(tmp_path)})
    assert "jemalloc" in libs.allocators
    assert "tcmalloc" in libs.allocators or any("tcmalloc: not found" in n for n in libs.notes)
    assert any("not an OpenMP build" in n for n in libs.notes)


def test_launcher_arguments_parse_with_the_real_launcher():
    import argparse

    from torch.backends.xeon.run_cpu import create_args

    def parse(text):
        parser = argparse.ArgumentParser()
        create_args(parser)
        return parser.parse_args([*text.split(), "worker.py"])

    je = parse(launcher_args("jemalloc", "intel"))
    assert je.enable_jemalloc and not je.disable_iomp
    default = parse(launcher_args("default", "gnu"))
    assert default.use_default_allocator and default.disable_iomp and not default.enable_tcmalloc
    assert parse(launcher_args("tcmalloc", "gnu")).enable_tcmalloc


def test_every_trial_config_passes_the_runtime_validator():
    space = search_space(4, [0.5, 0.8], Libraries(("jemalloc",), True))
    knobs = ("core_groups", "cpu_head_groups", "spinning", "micro_batch", "ratio")
    base = {k: v[0] for k, v in space.items()}
    for combo in itertools.product(*(space[k] for k in knobs)):
        settings = trial_settings({**base, **dict(zip(knobs, combo, strict=True))})
        config = RuntimeConfig.from_model_yaml(settings.model_overrides)  # raises on a bad knob
        assert config.core_groups == settings.model_overrides["hetserve"]["core_groups"]
    assert trial_settings({**base, "workers": 2}).model_overrides["maxWorkers"] == 2


def test_winner_files_keep_the_secure_config_and_change_only_tuned_keys(tmp_path):
    params = {**shipped(), "allocator": "jemalloc", "batchSize": 16, "workers": 2}
    base_config = yaml.safe_load((REPO / "config" / "model-config.yaml").read_text())
    config_path, props_path = write_winner(tmp_path, base_config, params, REPO / "config" / "config.properties")
    config = yaml.safe_load(config_path.read_text())
    assert config["batchSize"] == 16 and config["minWorkers"] == config["maxWorkers"] == 2
    assert config["hetserve"]["limits"] == base_config["hetserve"]["limits"]  # merged, not replaced
    RuntimeConfig.from_model_yaml(config)
    props = props_path.read_text()
    assert "cpu_launcher_args=--enable-jemalloc --disable-iomp" in props
    assert props.count("cpu_launcher_args=") == 1
    assert "disable_token_authorization=false" in props and "enable_model_api=false" in props
    assert merge_properties("a=1\n# a=2\n", {"a": "3", "b": "4"}) == "a=3\n# a=2\nb=4\n"


def test_a_trial_that_cannot_reach_the_share_of_the_best_is_pruned_after_one_point():
    options = TuneOptions(start_rate=5, factor=1.5, refine=0, prune_fraction=0.8)
    calls = []
    value, points, pruned = measure_max_rate(lambda r: calls.append(r) or fake_result(r, 30), options, best=100)
    assert pruned and value == 0 and calls == [80]
    calls.clear()
    value, points, pruned = measure_max_rate(lambda r: calls.append(r) or fake_result(r, 30), options, best=None)
    assert not pruned and calls[0] == 5 and 20 <= value < 30
    # trial 0 failing its first rate still gets a value from one lower point
    value, _, pruned = measure_max_rate(lambda r: fake_result(r, 3), options, best=None)
    assert not pruned and value == pytest.approx(1.25)


def test_study_starts_from_the_default_improves_on_it_and_prunes():
    space = with_defaults(search_space(2, [0.5, 0.8], Libraries(("jemalloc",), False)), shipped())
    calls: list = []
    options = TuneOptions(trials=25, start_rate=5, factor=1.25, refine=1, seed=3)
    study = run_study(space, fake_prepare(calls), options, defaults=shipped(), log=lambda _: None)
    report = study_report(study, options, space)
    default_cap = capacity_of(shipped())
    assert report["default"]["params"] == shipped()
    assert 0.75 * default_cap <= report["default"]["value"] < default_cap
    assert report["best"]["value"] > report["default"]["value"]
    assert report["gain_over_default"] == pytest.approx(report["best"]["value"] / report["default"]["value"])
    assert report["counts"]["PRUNED"] >= 1
    pruned_runs = [c for c in calls if len(c) == 1]
    assert pruned_runs, "a pruned trial measures exactly one point"
    effects = report["importance"]["main_effects"]
    assert effects["batchSize"]["eta_squared"] > effects["spinning"]["eta_squared"]
    assert set(report["importance"]["ped_anova"]) <= set(space)
    text = report_markdown(report)
    assert "| knob | PED-ANOVA |" in text and "gain" in text


def test_a_config_that_cannot_be_served_scores_zero_and_says_why():
    @contextlib.contextmanager
    def broken(params):
        raise TrialFailed("worker died: out of memory")
        yield  # pragma: no cover

    space = {"batchSize": (1, 2), "workers": (1,), "allocator": ("default",)}
    study = run_study(space, broken, TuneOptions(trials=2), log=lambda _: None)
    assert all(t.value == 0.0 for t in study.trials)
    assert "out of memory" in study.trials[0].user_attrs["error"]


def test_p99_objective_minimises_latency_at_the_fixed_rate():
    space = {"workers": (1, 2), "batchSize": (1, 8), "allocator": ("default",)}
    options = TuneOptions(trials=6, objective="p99", rate=25.0, criteria=Criteria(p99_ms=500))
    study = run_study(space, fake_prepare([]), options, log=lambda _: None)
    assert study.best_value == 40.0  # some config holds 25 req/s
    assert capacity_of({**study.best_params}) > 25


def test_main_effects_attribute_variance_to_the_knob_that_explains_it():
    rows = [({"a": 1, "b": "x"}, 10.0), ({"a": 1, "b": "y"}, 10.0), ({"a": 2, "b": "x"}, 20.0), ({"a": 2, "b": "y"}, 20.0)]
    effects = main_effects(rows)
    assert effects["a"]["eta_squared"] == pytest.approx(1.0)
    assert effects["b"]["eta_squared"] == pytest.approx(0.0)
    assert list(effects) == ["a", "b"]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="needs --rate"):
        TuneOptions(objective="p99")
    with pytest.raises(ValueError, match="prune_fraction"):
        TuneOptions(prune_fraction=0)


# ---------------------------------------------------------------- small budgets: canonical grid, local search

# The space benchmarks/tuner_vs_grid.py searches on a 2-core box (shipped defaults first)
SMALL = {"workers": (1, 2), "core_groups": ("numa", "size:1"), "cpu_head_groups": (0,), "spinning": (False,),
         "micro_batch": (0, 2), "batchSize": (4, 1), "maxBatchDelay": (5, 20), "ratio": (0.8, 1.0),
         "allocator": ("default",), "openmp": ("gnu",)}


def test_group_sizes_match_the_runtime_planner():
    from handlers.hardware.topology import Core, Topology, plan_groups

    for cores, nodes in ((2, 1), (4, 1), (8, 2), (16, 2)):
        topo = Topology(tuple(Core(i, (i,), i, i * nodes // cores, i * nodes // cores) for i in range(cores)))
        for policy in ("numa", "socket", "size:1", "size:2", "size:4"):
            for min_groups in (1, 2):
                planned = sorted((len(g.cpus) for g in plan_groups(topo, policy, min_groups)), reverse=True)
                assert list(group_sizes(policy, cores, nodes, min_groups)) == planned, (cores, nodes, policy)


def test_canonical_merges_only_names_of_one_configuration():
    base = {k: v[0] for k, v in SMALL.items()}
    canon = lambda p: canonical(p, SMALL, cores=2)  # noqa: E731
    # a one-core worker has one group whatever the policy
    assert canon({**base, "workers": 2, "core_groups": "size:1"})["core_groups"] == "numa"
    # a split model on one 2-core group is split into two 1-core groups: numa == size:1
    assert canon({**base, "core_groups": "size:1"})["core_groups"] == "numa"
    # ... but a whole model on 2 cores is one group under numa and two under size:1
    whole = {**base, "ratio": 1.0}
    assert canon({**whole, "core_groups": "size:1"})["core_groups"] == "size:1"
    assert canon({**whole, "micro_batch": 2})["micro_batch"] == 0  # one group: runs in series
    assert canon({**whole, "core_groups": "size:1", "micro_batch": 2})["micro_batch"] == 2
    assert canon({**base, "batchSize": 1, "maxBatchDelay": 20, "micro_batch": 2}) == {**base, "batchSize": 1}
    assert canon({**base, "maxBatchDelay": 20})["maxBatchDelay"] == 20
    assert list(canon(base)) == list(base)


def test_grid_is_every_distinct_configuration_once():
    import itertools

    grid = grid_points(SMALL, cores=2)
    keys = [config_key(p) for p in grid]
    assert len(keys) == len(set(keys)) == 19
    assert grid[0] == {k: v[0] for k, v in SMALL.items()}  # product order: the defaults first
    everything = [dict(zip(SMALL, c, strict=True)) for c in itertools.product(*SMALL.values())]
    assert {config_key(canonical(p, SMALL, 2)) for p in everything} == set(keys)
    assert len(grid_points(SMALL, cores=16)) > len(grid)  # more cores: fewer names coincide


def test_local_search_changes_one_knob_of_the_best_and_never_repeats():
    canon = lambda p: canonical(p, SMALL, cores=2)  # noqa: E731
    base = {k: v[0] for k, v in SMALL.items()}
    first = propose_local(SMALL, [(base, 10.0)], canon)
    assert first == {**base, "workers": 2}  # workers first; the other knobs as they were
    second = propose_local(SMALL, [(base, 10.0), (first, 20.0)], canon)
    assert second == {**first, "maxBatchDelay": 20}  # from the new best: the gather before the cut
    worse = propose_local(SMALL, [(base, 10.0), (first, 5.0)], canon)
    assert worse == {**base, "maxBatchDelay": 20}  # from the old best
    third = propose_local(SMALL, [(base, 10.0), (first, 20.0), (second, 30.0)], canon)
    assert third == {**second, "workers": 1}  # each knob re-tried from the new best, in order
    fourth = propose_local(SMALL, [(base, 10.0), (first, 20.0), (second, 30.0), (third, 25.0)], canon)
    assert fourth == {**second, "ratio": 1.0}
    rows = [(p, 1.0) for p in grid_points(SMALL, 2)]
    assert propose_local(SMALL, rows, canon) is None
    assert propose_local(SMALL, [], canon) is None


# The 2026-12-01 grid (benchmarks/results/tuner_vs_grid.json, ResNet-18, 8 closed-loop clients,
# 5 s points, load average ~2): (workers, core_groups, ratio, batchSize, maxBatchDelay, micro_batch)
# -> (2xx/s, p99 ms of all requests). Copied here so a later run of the benchmark does not change
# what this test checks.
RECORDED_GRID = {
    (1, "numa", 0.8, 4, 5, 0): (28.8, 338), (1, "numa", 1.0, 4, 5, 0): (29.6, 377),
    (1, "numa", 0.8, 4, 20, 0): (27.2, 387), (1, "numa", 1.0, 4, 20, 0): (28.8, 596),
    (1, "numa", 0.8, 1, 5, 0): (16.8, 538), (1, "numa", 1.0, 1, 5, 0): (28.4, 355),
    (1, "numa", 0.8, 4, 5, 2): (31.2, 300), (1, "numa", 0.8, 4, 20, 2): (29.6, 385),
    (1, "size:1", 1.0, 4, 5, 0): (29.6, 371), (1, "size:1", 1.0, 4, 20, 0): (30.4, 433),
    (1, "size:1", 1.0, 1, 5, 0): (15.8, 591), (1, "size:1", 1.0, 4, 5, 2): (32.0, 323),
    (1, "size:1", 1.0, 4, 20, 2): (22.4, 427), (2, "numa", 0.8, 4, 5, 0): (30.4, 481),
    (2, "numa", 1.0, 4, 5, 0): (32.4, 528), (2, "numa", 0.8, 4, 20, 0): (35.2, 309),
    (2, "numa", 1.0, 4, 20, 0): (32.8, 314), (2, "numa", 0.8, 1, 5, 0): (29.4, 375),
    (2, "numa", 1.0, 1, 5, 0): (33.6, 273),
}
GRID_KNOBS = ("workers", "core_groups", "ratio", "batchSize", "maxBatchDelay", "micro_batch")
OLD_LOCAL_ORDER = ("ratio", "workers", "core_groups", "batchSize", "maxBatchDelay", "micro_batch")


def recorded(params) -> tuple[float, float]:
    return RECORDED_GRID[tuple(params[k] for k in GRID_KNOBS)]


def recorded_score(params) -> float:
    return goodput_value(closed_result(*recorded(params)), Criteria(p99_ms=500))


def noisy_prepare(seed: int, noise: float = 0.03):
    """A server whose closed loop answers at the recorded rate and p99, the rate off by `noise`."""
    import random

    rng = random.Random(seed)

    @contextlib.contextmanager
    def prepare(params):
        rate, p99 = recorded(params)

        def closed(clients):
            assert clients == 8
            return closed_result(rate * (1 + rng.gauss(0, noise)), p99)

        yield TrialRunner(lambda rate: pytest.fail("the goodput objective runs no open loop"), closed)
    return prepare


def test_recorded_grid_covers_the_compared_space():
    grid = grid_points(SMALL, cores=2)
    assert {tuple(p[k] for k in GRID_KNOBS) for p in grid} == set(RECORDED_GRID)
    best = max(grid, key=recorded_score)
    assert (best["workers"], best["maxBatchDelay"]) == (2, 20)
    # the hard threshold scored this 0; the smooth score keeps it a close runner-up
    assert recorded_score({**best, "ratio": 1.0, "maxBatchDelay": 5}) == pytest.approx(32.4 * 500 / 528)


@pytest.mark.parametrize("default_workers", [1, 2])  # the shipped default now, and with minWorkers auto on 2 cores
def test_local_search_reaches_the_recorded_grid_best_with_a_quarter_of_its_trials(default_workers):
    """The study (`run_study`, search="local", the goodput objective through `goodput_value`) on the
    recorded grid, from the shipped default: without noise its pick is the grid's best (2 workers,
    maxBatchDelay 20) with len(grid) // 4 trials; with 3% noise per measurement it is >= 0.97x the
    best in most of 20 fixed-seed runs (noise can make a worse neighbour look best: no search of 4
    single measurements is immune)."""
    grid = grid_points(SMALL, cores=2)
    best = max(recorded_score(p) for p in grid)
    budget = len(grid) // 4
    canon = lambda p: canonical(p, SMALL, cores=2)  # noqa: E731
    defaults = canon({**{k: v[0] for k, v in SMALL.items()}, "workers": default_workers})

    def pick(seed: int, noise: float) -> float:
        options = TuneOptions(trials=budget, objective="goodput", search="local", seed=seed)
        study = run_study(SMALL, noisy_prepare(seed, noise), options, defaults=defaults, log=lambda _: None,
                          canon=canon)
        measured = [t for t in study.trials if not t.user_attrs.get("repeat_of_measured")]
        assert len(measured) == budget and len({config_key(t.user_attrs["config"]) for t in measured}) == budget
        return recorded_score(study.best_trial.user_attrs["config"]) / best

    assert pick(0, noise=0.0) == 1.0
    ratios = [pick(seed, noise=0.03) for seed in range(20)]
    assert sum(r >= 0.97 for r in ratios) >= 15, ratios


def test_the_old_order_missed_the_recorded_grid_best():
    """Why LOCAL_ORDER tries workers then maxBatchDelay before ratio: ratio first spends the
    budget on a knob that moves the recorded grid by a few percent."""
    canon = lambda p: canonical(p, SMALL, cores=2)  # noqa: E731
    best = max(recorded_score(p) for p in grid_points(SMALL, cores=2))

    def pick(order, start, budget=4) -> float:
        measured = [(start, recorded_score(start))]
        while len(measured) < budget:
            proposal = propose_local(SMALL, measured, canon, order=order)
            measured.append((proposal, recorded_score(proposal)))
        return recorded_score(max(measured, key=lambda m: m[1])[0]) / best

    default = {k: v[0] for k, v in SMALL.items()}
    assert pick(OLD_LOCAL_ORDER, default) < 0.97 and pick(OLD_LOCAL_ORDER, default, budget=5) < 0.97
    from hetserve.tuner import LOCAL_ORDER

    assert pick(LOCAL_ORDER, default) == 1.0
    assert pick(LOCAL_ORDER, canon({**default, "workers": 2})) == 1.0


def closed_result(goodput: float, p99_all: float, p99_ok: float | None = None, ok: int = 300,
                  error_rate: float = 0.0) -> LoadResult:
    stats = lambda p99: LatencyStats(ok, p99 / 2, p99 / 2, p99, p99, p99) if p99 is not None else LatencyStats(0, None, None, None, None, None)  # noqa: E731
    return LoadResult("closed", None, 8, None, 6.0, 1.0, 300, 300, 300, ok, goodput + 1.0, goodput, error_rate,
                      stats(p99_ok if p99_ok is not None else p99_all), stats(p99_all), {}, 0.1, 0.2, 0.0, 0.0, 8)


def test_goodput_is_answers_per_second_scaled_down_smoothly_past_the_p99_budget():
    budget = Criteria(p99_ms=500)
    assert goodput_value(closed_result(49.0, 300), budget) == 49.0  # under the budget: the full rate
    assert goodput_value(closed_result(49.0, 500), budget) == 49.0  # at it
    # 1% over costs 1%, not everything (the 2026-12-01 grid scored 32.4/s at p99 528 ms as 0)
    assert goodput_value(closed_result(32.4, 527.7), budget) == pytest.approx(32.4 * 500 / 527.7)
    assert goodput_value(closed_result(40.0, 1000), budget) == pytest.approx(20.0)
    # monotonic: a worse p99 never scores higher at the same rate
    scores = [goodput_value(closed_result(40.0, p99), budget) for p99 in (400, 510, 600, 900, 5000)]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # the p99 the criteria name: errors and timeouts included ("all") unless latency="ok"
    slow_errors = closed_result(40.0, p99_all=1000, p99_ok=250)
    assert goodput_value(slow_errors, budget) == pytest.approx(20.0)
    assert goodput_value(slow_errors, Criteria(p99_ms=500, latency="ok")) == 40.0


def test_goodput_is_zero_with_too_many_errors_or_no_answer():
    budget = Criteria(p99_ms=500)
    assert goodput_value(closed_result(49.0, 300, error_rate=0.05), budget) == 0.0
    assert goodput_value(closed_result(49.0, 300, error_rate=0.01), budget) == 49.0  # at the limit
    assert goodput_value(closed_result(0.0, 300, ok=0), budget) == 0.0
    assert goodput_value(closed_result(0.0, None, ok=0), budget) == 0.0  # no latency at all
    with pytest.raises(ValueError, match="search"):
        TuneOptions(search="grid")


# ---------------------------------------------------------------- live: one tiny trial pair


@pytest.mark.server
def test_live_trials_apply_the_allocator_and_reuse_the_warm_server(tmp_path):
    from hetserve.cli import main

    store = tmp_path / "src"
    assert main(["archive", "--model", "zoo:resnet18-tiny", "--model-name", "tiny", "--export-path", str(store),
                 "--ratios", "0.5", "--cost", "flops", "--quiet"]) == 0
    libs = find_libraries({"VIRTUAL_ENV": str(Path(__import__("sys").prefix))})
    allocator = libs.allocators[0] if libs.allocators else "default"
    harness = LiveHarness(store / "tiny.mar", tmp_path / "work", duration=1.5, warmup=0.3, jvm_warmup=0,
                          trial_warmup=0.5, log=lambda _: None)
    params = {**shipped(), "ratio": 0.5, "allocator": allocator}
    try:
        with harness.prepare(params) as at:
            first = at(5.0)
            pid = harness.server.process.pid
            preloaded = harness.preloaded()
        with harness.prepare({**params, "batchSize": 1, "ratio": 1.0}) as at:
            second = at(5.0)
            assert harness.server.process.pid == pid, "model-level knobs must not restart TorchServe"
        other = "default" if allocator != "default" else "jemalloc"
        with harness.prepare({**params, "allocator": other}) as at:  # server-level knob: restart
            third = at(5.0)
            assert harness.server.process.pid != pid
    finally:
        harness.close()
    assert all(r.ok > 0 and not r.errors for r in (first, second, third))
    if allocator != "default":
        assert f"lib{allocator}" in preloaded
