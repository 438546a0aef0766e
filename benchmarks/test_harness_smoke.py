"""A tiny run of each benchmark harness, so they do not rot between measuring sessions.

Not in the default test run (``testpaths = ["tests"]``): ``make test`` runs it once at
the end, on the compiled build; skipped under ``make bench-micro``
(``--benchmark-only``).  Alone:

    .venv/bin/python -m pytest benchmarks/test_harness_smoke.py -p no:cacheprovider -q

Without Redis the tests that need it skip, unless ``STEM_REQUIRE_SERVICES=1`` (CI): then
they fail.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))

import e2e  # noqa: E402
from tests.conftest import require_service  # noqa: E402  (the suite's rule for services)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def _redis():
    require_service("Redis", "127.0.0.1", 6379)   # skips, or fails under STEM_REQUIRE_SERVICES=1


needs_redis = pytest.mark.usefixtures("_redis")


@needs_redis
@pytest.mark.parametrize("broker,isolation", [("memory", "inline"), ("redis", "process"), ("sqlite", "process")])
def test_e2e_runs_every_phase_and_checks_each_task_ran_once(broker, isolation):
    cfg = e2e.Config(tasks=60, broker=broker, isolation=isolation, single=20, batch=25, live_batch=10,
                     redis_benchmark=False, progress=False, timeout=45)
    res = e2e.run(cfg)
    assert res["check"]["ok"], res["check"]
    assert res["check"]["distinct_ids"] == 120 and res["check"]["ran_twice"] == 0
    assert res["enqueue"]["single_per_s"] > 0 and res["enqueue"]["many_per_s"] > 0
    assert res["drain"]["from_start_per_s"] > 0 and res["live"]["per_s"] > 0
    # CPU comes in clock ticks (10 ms): 60 tasks' worth can read 0 (seen with the process engine)
    assert res["live"]["worker_cpu_us"] >= 0
    assert e2e.rows(res)


@needs_redis
def test_e2e_fire_and_forget_noop_leaves_nothing_behind():
    import redis
    cfg = e2e.Config(tasks=40, broker="redis", task="noop", results=False, signing=False, phases=("drain", "live"),
                     redis_benchmark=False, progress=False, timeout=45)
    res = e2e.run(cfg)
    assert res["check"]["ok"]
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"stembench-{res['run_id']}*"))


def test_e2e_rejects_bad_config():
    with pytest.raises(ValueError):
        e2e.run(e2e.Config(broker="kafka"))


def test_e2e_cli_parses_flags():
    cfg, _ = e2e.parse_args(["--tasks", "5", "--no-results", "--no-signing", "--phases", "live", "--payload", "1k"])
    assert (cfg.tasks, cfg.results, cfg.signing, cfg.phases, cfg.payload) == (5, False, False, ("live",), "1k")


def test_peers_ratios_per_repeat_cancel_a_drift_of_the_machine():
    import run as peers
    # the machine halves its speed after the first repeat: both systems slow down together
    runs = [{"system": "stem", "repeat": 0, "per_s": 6000, "worker_cpu_us": 150},
            {"system": "huey", "repeat": 0, "per_s": 2000, "worker_cpu_us": 450},
            {"system": "stem", "repeat": 1, "per_s": 3000, "worker_cpu_us": 300},
            {"system": "huey", "repeat": 1, "per_s": 1000, "worker_cpu_us": 900},
            {"system": "stem", "repeat": 2, "per_s": 3300, "worker_cpu_us": 280},
            {"system": "huey", "repeat": 2, "error": "boom"}]
    for r in runs:
        if "error" not in r:
            r.update(settings="-", extra_runs=0)
    rows = {r["system"]: r for r in peers.summarize(["stem", "huey"], runs)}
    assert rows["huey"]["stem_speedup"] == pytest.approx(3300 / 1500)     # the medians mix the two speeds
    assert rows["huey"]["paired_speedup"] == pytest.approx(3.0)           # each repeat says 3x
    assert rows["huey"]["paired_cpu_vs_stem"] == pytest.approx(3.0)
    assert rows["stem"]["paired_speedup"] == pytest.approx(1.0)


@needs_redis
def test_peers_bare_loop_and_stem_drive_and_summarize():
    import run as peers
    # 2,000 tasks: CPU time is read in clock ticks (10 ms), and the bare loop ran 200 tasks in under one tick
    res = peers.run(["stem", "bare"], base_url="redis://127.0.0.1:6379", tasks=2000, concurrency=2, warmup=20,
                    repeat=1, timeout=45, progress=False)
    assert not [r for r in res["runs"] if "error" in r], res["runs"]
    rows = {r["system"]: r for r in res["summary"]}
    assert rows["stem"]["stem_speedup"] == pytest.approx(1.0)
    assert rows["bare"]["per_s"] > 0 and rows["bare"]["worker_cpu_us"] > 0
    assert rows["stem"]["extra_runs"] == 0
    assert all(p > 0 for p in rows["stem"]["probe_ms"] + rows["bare"]["probe_ms"])


@needs_redis
def test_peers_single_enqueue_mode_drives_every_task_through_the_one_task_call():
    import run as peers
    res = peers.run(["stem", "bare"], base_url="redis://127.0.0.1:6379", tasks=1000, concurrency=2, warmup=20,
                    repeat=1, timeout=45, progress=False, producer_mode="single")
    assert not [r for r in res["runs"] if "error" in r], res["runs"]
    assert res["config"]["producer"] == "single"
    rows = {r["system"]: r for r in res["summary"]}
    assert rows["stem"]["extra_runs"] == 0 and rows["bare"]["per_s"] > 0
    assert rows["stem"]["producer_cpu_us"] > 0


@needs_redis
@pytest.mark.parametrize("yield_cpu", [True, False])
def test_cpu_latency_reports_latencies_and_leaves_nothing_behind(yield_cpu):
    import redis
    import cpu_latency
    line = cpu_latency.run(REDIS_URL, yield_cpu, tasks=8, ms=1.0, concurrency=1)
    assert line.startswith(f"yield_cpu={'on' if yield_cpu else 'off'}: 8 x 1 ms tasks") and "p90" in line
    assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match="stembench-lat-*"))


def test_in_process_cpu_is_not_rounded_to_clock_ticks():
    """The in-process worker's CPU is process CPU minus the producer thread's: both must use one clock."""
    from _measure import TreeMeter
    meter = TreeMeter(os.getpid())
    root0, _ = meter.cpu_split()
    t0 = time.thread_time()
    while time.thread_time() - t0 < 0.002:   # 2 ms of CPU: under one 10 ms tick
        pass
    burnt = time.thread_time() - t0
    root1, _ = meter.cpu_split()
    assert root1 - root0 >= burnt


@needs_redis
def test_chord_benchmark_runs_both_rounds_and_checks_the_callback():
    from benchmarks import chord as chord_bench
    url = f"redis://127.0.0.1:6379/{os.environ.get('STEM_TEST_REDIS_OWN_DB', '0')}"
    res = chord_bench.run(url, 300, 2, "inline", 1)
    assert res["n"] == 300 and res["rounds"] == 1
    assert res["enqueue_ratio"] > 0 and res["worker_cpu_ratio"] > 0
    assert res["chord"]["enqueue_us_per_task"] > 0


@needs_redis
def test_dashboard_render_bench_times_every_page():
    pytest.importorskip("starlette", reason="the dashboard extra is not installed")
    import dashboard_render
    res = dashboard_render.run(REDIS_URL, workers=3, queues=5, renders=2)
    assert set(res["pages"]) == set(dashboard_render.PAGES)
    assert all(f["median_ms"] > 0 and f["bytes"] > 0 for f in res["pages"].values())


@pytest.mark.parametrize("adapters, procs", [("memory,sqlite", "1,2"), ("postgres", "1,2")])
def test_wf_store_bench_activates_every_run_and_times_due(adapters, procs, capsys):
    if adapters == "postgres":
        require_service("PostgreSQL", "127.0.0.1", 5432)
    import wf_store
    wf_store.main(["--runs", "30", "--steps", "2", "--rounds", "1", "--procs", procs, "--terminal", "100",
                   "--adapters", adapters])
    lines = [line for line in capsys.readouterr().out.splitlines() if "procs=" in line]
    expected = [(a, p) for a in adapters.split(",") for p in procs.split(",") if not (a == "memory" and p != "1")]
    assert [(line.split()[0], line.split()[1]) for line in lines] == [(a, f"procs={p}:") for a, p in expected]
    assert all("activations/s" in line for line in lines)
    assert all("due ms" in line for line in lines if "procs=1:" in line)


@needs_redis
def test_wf_store_redis_bench_times_a_round_of_activations_and_a_sweep():
    import wf_store_redis
    calls, activations, due_ms = wf_store_redis.one_round(REDIS_URL, runs=20, steps=2)
    assert calls == pytest.approx(activations * 4) and due_ms > 0


def test_wf_runs_bench_finishes_every_run_of_both_workflows(capsys):
    import wf_runs
    wf_runs.main(["--runs", "5", "--stores", "sqlite"])
    out = capsys.readouterr().out
    assert "two.steps" in out and "step.sleep.step" in out and out.count("5 runs: started") == 2


def test_peers_paced_single_producer_counts_redis_commands_and_runs_a_baseline_checkout(tmp_path):
    """``--rate`` paces the one-task producer, the commands per task come from INFO commandstats
    (no reset), and ``--stem-baseline`` runs stem from another checkout (this one, here); on a
    redis-server of this test alone (stem-base's db 8 belongs to the main test run elsewhere)."""
    import shutil
    import run as peers
    from tests.support import RedisServer
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path).start()
    os.environ["STEM_BENCH_BASELINE"] = os.path.dirname(HERE)
    try:
        res = peers.run(["stem", peers.BASELINE], base_url=f"redis://127.0.0.1:{server.port}", tasks=300,
                        concurrency=2, warmup=20, repeat=1, timeout=45, progress=False, producer_mode="single",
                        rate=400.0, monitor=True)
    finally:
        os.environ.pop("STEM_BENCH_BASELINE", None)
        server.kill()
    assert not [r for r in res["runs"] if "error" in r], res["runs"]
    for run in res["runs"]:
        assert run["per_s"] <= 400 * 1.1                       # paced
        assert run["redis_commands"].get("xadd", 0) >= 1.0      # one XADD a task, at least
        assert run["client_commands"].get("xadd", 0) >= 1.0 and run["client_commands_per_task"] >= 2


def test_single_enqueue_harness_runs_every_mode_against_a_baseline():
    import shutil
    import subprocess
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    out = subprocess.run([sys.executable, os.path.join(HERE, "single_enqueue.py"), "--tasks", "1000", "--rounds", "1",
                          "--threads", "--parts", "--baseline", os.path.dirname(HERE)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wall ratio" in out.stdout and "after/before" in out.stdout and "8 threads" in out.stdout
    assert "parts: enqueue" in out.stdout
