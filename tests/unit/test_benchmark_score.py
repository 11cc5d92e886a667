"""The pure parts of benchmarks/run_contest.py: the score, k6's percentile, the per-second
series, the schedule shading, the result's shape, the floor's nginx.conf, and the medians,
ratio and summary of --repeat. No k6, no stack (nginx -t checks the floor's nginx.conf when
nginx is installed)."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_runner():
    spec = importlib.util.spec_from_file_location(
        "run_contest", REPO / "benchmarks" / "run_contest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_contest"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


rc = _load_runner()

# docs/contest.md, "The official run": (at_s, default (delay, failure), fallback (delay, failure)).
CONTEST_SCHEDULE = [
    {"at_s": at, "default": {"delay_ms": dd, "failure": df},
     "fallback": {"delay_ms": fd, "failure": ff}}
    for at, (dd, df), (fd, ff) in [
        (1, (0, False), (0, False)),
        (10, (100, False), (0, False)),
        (20, (100, True), (0, False)),
        (30, (2000, True), (1000, True)),
        (40, (20, False), (20, False)),
        (50, (0, False), (5000, False)),
    ]
]


def _score(**overrides):
    args = dict(default_requests=100, fallback_requests=0, default_cents=100 * 1990,
                fallback_cents=0, fee_rate_default=0.05, fee_rate_fallback=0.15, p99_ms=20.0,
                inconsistencies=0, accepted=100)
    args.update(overrides)
    return rc.score(**args)


# --- score ------------------------------------------------------------------------------------


def test_the_best_2025_entry_scores_what_the_contest_published():
    # docs/contest.md: 380,036 for 16,752 payments all on default, p99 1.25 ms, no inconsistency.
    s = _score(default_requests=16752, default_cents=16752 * 1990, p99_ms=1.25, accepted=16752)
    assert s.total_amount == 333364.80
    assert s.fees == 16668.24
    assert s.profit == 316696.56
    assert s.bonus == 0.20
    assert round(s.final) == 380036
    assert s.lag == 0 and not s.disqualified


@pytest.mark.parametrize(("p99_ms", "bonus"), [
    (11.0, 0.0), (25.0, 0.0), (10.0, 0.02), (9.0, 0.04), (5.0, 0.12), (1.0, 0.20),
    (1.25, 0.20),  # docs/contest.md: the full 20 % at p99 <= 1.25 ms
    (1.244, 0.20), (4.48, 0.13), (10.76, 0.0), (10.74, 0.01), (0.5, 0.21),
])
def test_p99_bonus(p99_ms, bonus):
    assert rc.p99_bonus(p99_ms) == bonus


def test_fees_follow_each_processors_rate():
    s = _score(default_requests=100, fallback_requests=10, default_cents=100 * 1990,
               fallback_cents=10 * 1990, accepted=110)
    assert s.total_amount == 2189.00
    assert s.fees == 129.35  # 1990.00 * 5 % + 199.00 * 15 %
    assert s.profit == 2059.65
    assert s.final == 2059.65  # p99 20 ms: no bonus


def test_any_inconsistency_costs_35_percent():
    clean = _score(p99_ms=6.0)
    fined = _score(p99_ms=6.0, inconsistencies=1)
    assert clean.fine == 0.0 and fined.fine == 0.35
    assert fined.final == rc.round2(clean.profit * (1 + 0.10 - 0.35))


def test_positive_lag_is_reported_and_negative_lag_disqualifies():
    queued = _score(accepted=105)
    assert queued.lag == 5 and not queued.disqualified and queued.final == queued.profit
    slush = _score(accepted=99)
    assert slush.lag == -1 and slush.disqualified
    assert slush.final == 0.0 and slush.final_if_qualified == slush.profit


def test_score_from_k6_summary_reads_the_script_numbers():
    summary = _k6_summary()
    s = rc.score_from_k6_summary(summary)
    assert s.total_amount == 199.00 + 39.80
    assert s.p99_ms == 3.0 and s.bonus == 0.16
    assert s.lag == 0


def test_the_k6_script_uses_the_same_constants():
    script = (REPO / "benchmarks" / "k6" / "contest.js").read_text()
    assert "const BONUS_P99_CEILING_MS = 11;" in script
    assert "const BONUS_PER_MS = 0.02;" in script
    assert "const INCONSISTENCY_FINE = 0.35;" in script
    steps = re.findall(
        r"\{ at_s: (\d+), default: \{ delay_ms: (\d+), failure: (true|false) \}, "
        r"fallback: \{ delay_ms: (\d+), failure: (true|false) \} \}", script)
    assert [
        {"at_s": int(at), "default": {"delay_ms": int(dd), "failure": df == "true"},
         "fallback": {"delay_ms": int(fd), "failure": ff == "true"}}
        for at, dd, df, fd, ff in steps
    ] == CONTEST_SCHEDULE


# --- percentile -------------------------------------------------------------------------------


def test_percentile_interpolates_like_k6():
    values = [float(v) for v in range(100, 0, -1)]  # 100..1, unsorted on purpose
    assert rc.percentile(values, 0.99) == pytest.approx(99.01)
    assert rc.percentile(values, 0.5) == pytest.approx(50.5)
    assert rc.percentile(values, 1.0) == 100.0
    assert rc.percentile([7.0], 0.99) == 7.0
    assert rc.percentile([], 0.99) == 0.0


def test_percentile_of_a_long_tail():
    values = [1.0] * 990 + [1500.0] * 10  # 1 % timeouts
    assert rc.percentile(values, 0.99) == pytest.approx(1.0 + 1499.0 * 0.01, rel=1e-9)


# --- k6 samples -------------------------------------------------------------------------------

K6_CSV = """\
metric_name,timestamp,metric_value,expected_response,method,name,scenario,status,extra_tags,metadata
http_reqs,1000000000000,1.000000,true,POST,purge,,200,,
http_req_duration,1000000000000,3.500000,true,POST,purge,,200,,
schedule_step,1000000000100,0.000000,,,,schedule,,,
http_req_duration,1000000000200,1.000000,true,POST,payments,payments,202,,
http_req_duration,1000000000900,2.000000,true,POST,payments,payments,202,,
schedule_step,1000000001100,1.000000,,,,schedule,,,
http_req_duration,1000000001150,1500.000000,false,POST,payments,payments,0,,
http_req_duration,1000000001300,4.000000,false,POST,payments,payments,500,,
http_req_duration,1000000001400,0.800000,true,GET,summary,consistency,200,,
http_req_waiting,1000000001400,0.700000,true,GET,summary,consistency,200,,
schedule_step,1000000002100,2.000000,,,,schedule,,,
"""


def test_parse_k6_csv_keeps_requests_and_schedule_steps():
    samples = rc.parse_k6_csv(io.StringIO(K6_CSV))
    assert len(samples.requests) == 6
    assert samples.requests[3] == rc.Request(1000000001150, 1500.0, "payments", 0)
    assert samples.schedule_steps == {0: 1000000000100, 1: 1000000001100, 2: 1000000002100}
    assert samples.t0_ms == 1000000000100


def test_t0_falls_back_to_the_first_request():
    samples = rc.parse_k6_csv(io.StringIO(
        "\n".join(line for line in K6_CSV.splitlines() if "schedule_step" not in line)))
    assert samples.t0_ms == 1000000000000


def test_per_second_series():
    samples = rc.parse_k6_csv(io.StringIO(K6_CSV))
    series = rc.per_second(samples, samples.t0_ms)
    # The setup's purge came 100 ms before t0: second -1.
    assert series["second"] == [-1, 0, 1]
    assert series["requests"] == [1, 2, 3]
    assert series["payments_ok"] == [0, 2, 0]
    assert series["payments_failed"] == [0, 0, 2]
    assert series["p99_ms"][1] == pytest.approx(1.99)
    assert series["max_ms"] == [3.5, 2.0, 1500.0]


def test_per_second_of_nothing():
    series = rc.per_second(rc.K6Samples(), 0)
    assert series["second"] == [] and series["p99_ms"] == []


# --- schedule shading -------------------------------------------------------------------------


def test_the_contest_schedule_shades_as_listed():
    got = [(i.processor, i.state, i.delay_ms, i.start_s, i.end_s)
           for i in rc.schedule_intervals(CONTEST_SCHEDULE, 60)]
    assert got == [
        ("default", "slow", 100, 10, 20),
        ("default", "failing", 100, 20, 30),
        ("default", "failing", 2000, 30, 40),
        ("default", "slow", 20, 40, 50),
        ("fallback", "failing", 1000, 30, 40),
        ("fallback", "slow", 20, 40, 50),
        ("fallback", "slow", 5000, 50, 60),
    ]


def test_shading_uses_the_times_k6_applied_the_steps():
    applied = {0: 1.02, 1: 10.05, 2: 20.01, 3: 30.2, 4: 40.0, 5: 50.3}
    intervals = rc.schedule_intervals(CONTEST_SCHEDULE, 61.5, applied)
    first_default = intervals[0]
    assert (first_default.start_s, first_default.end_s) == (10.05, 20.01)
    assert intervals[-1].processor == "fallback" and intervals[-1].end_s == 61.5


def test_shading_merges_identical_neighbours_and_scales():
    schedule = [
        {"at_s": 0.25, "default": {"delay_ms": 0, "failure": True},
         "fallback": {"delay_ms": 0, "failure": False}},
        {"at_s": 2.5, "default": {"delay_ms": 0, "failure": True},
         "fallback": {"delay_ms": 0, "failure": False}},
        {"at_s": 5, "default": {"delay_ms": 0, "failure": False},
         "fallback": {"delay_ms": 0, "failure": False}},
    ]
    assert rc.schedule_intervals(schedule, 15) == [
        rc.Interval("default", "failing", 0, 0.25, 5.0)]


def test_a_step_past_the_end_is_dropped():
    assert rc.schedule_intervals(CONTEST_SCHEDULE, 25)[-1].end_s == 25
    assert all(i.start_s < 25 for i in rc.schedule_intervals(CONTEST_SCHEDULE, 25))


# --- cgroups and the result -------------------------------------------------------------------


def test_cgroup_usage_is_the_difference_over_the_run():
    first = {"cpu_ns": 1_000_000_000, "nr_periods": 10, "nr_throttled": 1,
             "throttled_ns": 5_000_000, "mem_peak_bytes": 10}
    last = {"cpu_ns": 3_500_000_000, "nr_periods": 610, "nr_throttled": 4,
            "throttled_ns": 20_000_000, "mem_peak_bytes": 50 * 2**20,
            "cpu_quota_cores": 0.65, "mem_limit_bytes": 160 * 2**20}
    usage = rc.cgroup_usage(first, last, [{"rss_bytes": 5}, {"rss_bytes": 9}, {}])
    assert usage == {
        "cpu_s": 2.5, "periods": 600, "throttled_periods": 3, "throttled_s": 0.015,
        "peak_memory_bytes": 50 * 2**20, "peak_rss_bytes": 9, "cpu_quota_cores": 0.65,
        "memory_limit_bytes": 160 * 2**20,
    }
    assert rc.cgroup_usage({}, {}, [])["cpu_s"] is None


def test_read_cgroup_parses_v1_files(tmp_path):
    for name in ("cpu", "cpuacct", "memory"):
        (tmp_path / name).mkdir()
    (tmp_path / "cpuacct" / "cpuacct.usage").write_text("123456789\n")
    (tmp_path / "cpu" / "cpu.stat").write_text(
        "nr_periods 50\nnr_throttled 2\nthrottled_time 777\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("65000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    (tmp_path / "memory" / "memory.max_usage_in_bytes").write_text("2000\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory" / "memory.stat").write_text("cache 10\nrss 300\ntotal_rss 400\n")
    snap = rc.read_cgroup({name: str(tmp_path / name) for name in ("cpu", "cpuacct", "memory")})
    assert snap == {"cpu_ns": 123456789, "nr_periods": 50, "nr_throttled": 2,
                    "throttled_ns": 777, "cpu_quota_cores": 0.65, "mem_bytes": 1000,
                    "mem_peak_bytes": 2000, "rss_bytes": 400}
    assert rc.read_cgroup({"cpu": str(tmp_path / "gone")}) == {}


def _k6_summary():
    return {
        "schedule": CONTEST_SCHEDULE,
        "http": {"requests": 6, "p99_ms": 3.0, "p99_expected_response_ms": 2.0},
        "payments": {"accepted": 12, "failed": 2},
        "consistency": {"checks": 6, "errors": 0, "inconsistencies": 0,
                        "inconsistencies_strict": 0},
        "backend_summary": {"ok": True,
                            "default": {"totalRequests": 10, "totalAmount": 199.0},
                            "fallback": {"totalRequests": 2, "totalAmount": 39.8}},
        "processor_summary": {"default": {"totalRequests": 10},
                              "fallback": {"totalRequests": 2}},
        "fee_rates": {"default": 0.05, "fallback": 0.15},
        "score": {"final": 0.0},
        "thresholds": {"http_req_duration": {"p(99)<11": True},
                       "inconsistencies": {"count<=0": True},
                       "http_req_duration{expected_response:true}": {"max>=0": True}},
    }


def _result(k6_summary, cgroups):
    samples = rc.parse_k6_csv(io.StringIO(K6_CSV))
    t0_s = samples.t0_ms / 1000
    rows = [{"t": t0_s + 0.2 * i, "holding": {"api1": i, "api2": None},
             "cgroups": {name: {"cpu_ns": i * 10**8} for name in cgroups}} for i in range(5)]
    return rc.build_result(
        conditions={"started_at": "2025-01-01 00:00:00 UTC", "nproc": 2, "cpu_model": "x",
                    "load_average_at_start": [0.1, 0.2, 0.3], "limits": "contest",
                    "k6_version": "v1.1.0", "max_requests": 550, "duration_scale": 1.0},
        k6_summary=k6_summary, k6_exit_code=0, samples=samples,
        processed={"default": {int(t0_s): 3, int(t0_s) + 1: 4}, "fallback": {}},
        sampler_rows=rows, cgroups={name: rc.cgroup_usage({}, {}, []) for name in cgroups},
        files={"dir": "/tmp/x"},
    )


def test_result_shape():
    summary = _k6_summary()
    summary["schedule"] = [{"at_s": 0.25, "default": {"delay_ms": 0, "failure": True},
                            "fallback": {"delay_ms": 0, "failure": False}}]
    result = _result(summary, ["api1", "api2", "nginx"])
    assert json.loads(json.dumps(result)) == result  # plain JSON all the way down
    assert set(result) == {"schema", "conditions", "score", "k6", "http", "cgroups",
                           "instances_at_end", "timeline", "files"}
    # By hand: 238.80 - fees (199.00 x 5 % + 39.80 x 15 % = 15.92) = 222.88, x 1.16 (p99 3 ms).
    assert result["score"]["final"] == 258.54
    assert result["http"]["requests"] == 6
    assert result["http"]["p99_ms_k6"] == 3.0
    assert result["k6"]["thresholds_crossed"] is False
    tl = result["timeline"]
    assert set(tl) == {"t0_epoch_ms", "per_second", "processed_per_s", "samples",
                       "schedule_applied_at_s", "schedule_intervals"}
    assert tl["schedule_applied_at_s"] == {"0": 1.0, "1": 2.0}
    assert tl["samples"][1]["t_s"] == 0.2
    # The step k6 applied 1.0 s after t0 lasts until the last second of samples ends.
    assert tl["schedule_intervals"] == [{"processor": "default", "state": "failing",
                                         "delay_ms": 0, "start_s": 1.0, "end_s": 2}]


def test_result_without_a_k6_summary_has_no_score():
    result = _result(None, [])
    assert result["score"] is None
    assert "no score" in rc.format_table(result)


def test_score_table_names_every_number():
    table = rc.format_table(_result(_k6_summary(), ["api1", "api2", "nginx"]))
    for needle in ("final score", "profit", "fees", "p99", "bonus", "inconsistencies", "lag",
                   "payments default", "payments fallback", "failed POSTs", "CPU s",
                   "peak mem MB", "throttled", "nproc 2", "limits contest", "k6 v1.1.0",
                   "MAX_REQUESTS 550", "DURATION_SCALE 1.0", "api2", "nginx"):
        assert needle in table, needle
    assert "expected_response" not in table
    assert "none (limits off)" in rc.format_table(_result(_k6_summary(), []))


# --- the holding-table probe ------------------------------------------------------------------


def test_holding_depth_agrees_with_the_table_iterator():
    from rinha.holding import QUEUED, RECORDING, SENDING, HeldPayment, HoldingTable

    name = f"/rinha-test-{uuid.uuid4().hex[:8]}-holding"
    table = HoldingTable.create(name, 256)
    try:
        assert rc.holding_depth(table) == 0
        for slot, state in [(0, QUEUED), (7, SENDING), (100, RECORDING), (255, QUEUED)]:
            table.write(HeldPayment(slot=slot, correlation_id=uuid.uuid4().bytes, cents=1990,
                                    held_since_ms=1, state=state))
        assert rc.holding_depth(table) == 4 == sum(1 for _ in table.held())
        table.free(7)
        assert rc.holding_depth(table) == 3 == sum(1 for _ in table.held())
    finally:
        table.close()
        HoldingTable.unlink(name)


def test_machine_busy_cores():
    assert rc.machine_busy_cores((100, 1000), (400, 1400), 2) == 1.5
    assert rc.machine_busy_cores(None, (1, 2), 2) is None
    assert rc.machine_busy_cores((5, 10), (5, 10), 2) is None
    busy, total = rc.read_cpu_times()
    assert 0 <= busy <= total


# --- the floor ----------------------------------------------------------------------------------


def _floor_conf(tmp_path):
    from rinha_lab.nginx_conf import render_local

    rendered = render_local((REPO / "nginx.conf").read_text(), api_addrs=rc.FLOOR_UNUSED_UPSTREAMS,
                            listen="127.0.0.1:9999", run_dir=str(tmp_path))
    return rendered, rc.floor_nginx_conf(rendered)


def _location(text, spec):
    match = re.search(rf"^([ \t]*)location {re.escape(spec)} \{{.*?^\1\}}", text,
                      re.MULTILINE | re.DOTALL)
    assert match, spec
    return match.group(0)


def test_the_floor_answers_both_routes_from_nginx_itself(tmp_path):
    _, floor = _floor_conf(tmp_path)
    payments = _location(floor, "/")
    summary = _location(floor, "= /payments-summary")
    assert "return 202;" in payments and "proxy_pass" not in payments
    assert "proxy_pass" not in summary
    body = re.search(r"return 200 '([^']*)';", summary).group(1)
    assert json.loads(body) == {"default": {"totalRequests": 0, "totalAmount": 0},
                                "fallback": {"totalRequests": 0, "totalAmount": 0}}
    assert "default_type application/json;" in summary


def test_the_floor_keeps_every_other_line_of_the_product_nginx(tmp_path):
    rendered, floor = _floor_conf(tmp_path)

    def outside_the_two_locations(text):
        for spec in ("/", "= /payments-summary"):
            text = text.replace(_location(text, spec), "")
        return [line for line in text.splitlines() if line.strip()]

    assert outside_the_two_locations(floor)[1:] == outside_the_two_locations(rendered)
    assert floor.count("location ") == rendered.count("location ")
    assert "listen 127.0.0.1:9999;" in floor and "worker_processes 1;" in floor


def test_the_floor_refuses_an_nginx_conf_without_its_locations():
    with pytest.raises(ValueError, match="location /"):
        rc.floor_nginx_conf("http {\n    server {\n        listen 9999;\n    }\n}\n")
    twice = "server {\n    location = /payments-summary {\n    }\n    location / {\n    }\n}\n"
    with pytest.raises(ValueError, match="found 2"):
        rc.floor_nginx_conf(twice + twice)


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="no nginx")
def test_nginx_accepts_the_floor(tmp_path):
    _, floor = _floor_conf(tmp_path)
    conf = tmp_path / "nginx.conf"
    conf.write_text(floor)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    checked = subprocess.run([nginx, "-t", "-q", "-p", f"{tmp_path}/", "-e", "stderr", "-c",
                              str(conf)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


def test_the_hop_runs_over_loopback_ports_or_unix_sockets_in_the_run_directory(tmp_path):
    assert rc.hop_upstreams("tcp", tmp_path) == rc.FLOOR_UNUSED_UPSTREAMS
    assert rc.hop_upstreams("unix", tmp_path) == (f"unix:{tmp_path}/api1.sock",
                                                  f"unix:{tmp_path}/api2.sock")
    with pytest.raises(ValueError, match="tcp, unix"):
        rc.hop_upstreams("udp", tmp_path)
    from rinha_lab.nginx_conf import render_local

    # Only the two server lines change: keep-alive and the rest stay the product's.
    rendered = render_local((REPO / "nginx.conf").read_text(),
                            api_addrs=rc.hop_upstreams("unix", tmp_path),
                            listen="127.0.0.1:9999", run_dir=str(tmp_path))
    assert f"server unix:{tmp_path}/api1.sock fail_timeout=1s;" in rendered
    assert f"server unix:{tmp_path}/api2.sock fail_timeout=1s;" in rendered
    assert "keepalive 256;" in rendered


def test_hop_over_is_an_option_of_the_hop_floor():
    assert rc.parse_args([]).hop_over == "tcp"
    assert rc.parse_args(["--floor-hop", "--hop-over", "unix"]).hop_over == "unix"
    for bad in (["--hop-over", "unix"], ["--floor-hop", "--hop-over", "udp"]):
        with pytest.raises(SystemExit):
            rc.parse_args(bad)


def test_the_floor_table_says_what_it_is():
    result = _result(_k6_summary(), ["nginx"])
    result["conditions"]["mode"] = "floor"
    table = rc.format_table(result)
    assert table.startswith("floor run")
    assert "describe no backend" in table
    assert "final score" in table and "p99" in table  # the same table otherwise
    assert rc.format_table(_result(_k6_summary(), [])).startswith("rinha local contest run")


# --- --repeat: medians, ratio, summary --------------------------------------------------------


def test_median():
    assert rc.median([3.0, 1.0, 2.0]) == 2.0
    assert rc.median([4, 1, 3, 2]) == 2.5
    assert rc.median([5.0, None, 1.0, None, 3.0]) == 3.0  # a run without the figure is left out
    assert rc.median([7]) == 7.0 and isinstance(rc.median([7]), float)
    assert rc.median([]) is None and rc.median([None]) is None


def test_ratio():
    assert rc.ratio(6.0, 2.0) == 3.0
    assert rc.ratio(None, 2.0) is None
    assert rc.ratio(1.0, None) is None
    assert rc.ratio(1.0, 0.0) is None


def test_round_order_alternates_floor_and_product():
    assert rc.round_order(2) == [(1, "floor"), (1, "product"), (2, "floor"), (2, "product")]
    assert rc.round_order(2, interleave=False) == [(1, "floor"), (2, "floor"),
                                                   (1, "product"), (2, "product")]
    assert rc.round_order(1) == [(1, "floor"), (1, "product")]


def test_run_figures_from_a_result():
    result = _result(_k6_summary(), ["api1", "api2", "nginx"])
    result["cgroups"]["api1"]["cpu_s"] = 2.0
    result["cgroups"]["api2"]["cpu_s"] = 1.5
    result["cgroups"]["nginx"]["cpu_s"] = 0.5
    result["conditions"].update(k6_cpu_s=30.0, machine_busy_cores=1.8)
    figures = rc.run_figures(result)
    assert figures["mode"] == "product"  # results from before modes existed are the product
    assert figures["p99_ms"] == 3.0 and figures["p99_expected_response_ms"] == 2.0
    assert figures["final_score"] == 258.54
    assert figures["inconsistencies"] == 0 and figures["lag"] == 0
    assert figures["default_pct"] == pytest.approx(100 * 10 / 12)
    assert figures["failed_posts"] == 2
    assert figures["stack_cpu_s"] == 4.0 and figures["nginx_cpu_s"] == 0.5
    assert figures["k6_cpu_s"] == 30.0 and figures["machine_busy_cores"] == 1.8
    assert figures["exit_code"] == 0 and figures["dir"] == "/tmp/x"
    assert set(rc.FIGURES) <= set(figures)


def test_run_figures_without_a_summary_or_cgroups():
    figures = rc.run_figures(_result(None, []))
    assert figures["p99_ms"] is None and figures["default_pct"] is None
    assert figures["stack_cpu_s"] is None and figures["nginx_cpu_s"] is None


def _run(round_no, mode, p99, **more):
    figures = {key: None for key in rc.FIGURES}
    figures.update(round=round_no, mode=mode, p99_ms=p99, dir=f"/r/{round_no:02d}-{mode}",
                   load_average_at_start=[0.5, 0.4, 0.3], **more)
    return figures


def test_repeat_summary_shape_medians_and_ratio():
    runs = [_run(1, "floor", 2.0, final_score=0.0), _run(1, "product", 3.0, final_score=100.0),
            _run(2, "floor", 2.5), _run(2, "product", 5.5, final_score=90.0),
            _run(3, "floor", 2.2), _run(3, "product", 4.4, final_score=95.0, lag=1)]
    summary = rc.repeat_summary(runs, {"repeat": 3, "interleave": True})
    assert json.loads(json.dumps(summary)) == summary  # plain JSON all the way down
    assert set(summary) == {"schema", "conditions", "runs", "count", "median", "p99_ratio",
                            "p99_ratio_per_round", "p99_ratio_per_round_median"}
    assert summary["count"] == {"floor": 3, "product": 3}
    assert set(summary["median"]) == {"floor", "product"}
    assert set(summary["median"]["product"]) == set(rc.FIGURES)
    assert summary["median"]["floor"]["p99_ms"] == 2.2
    assert summary["median"]["product"]["p99_ms"] == 4.4
    assert summary["median"]["product"]["final_score"] == 95.0
    assert summary["median"]["product"]["lag"] == 1.0  # the only run that has it
    assert summary["median"]["floor"]["lag"] is None
    assert summary["p99_ratio"] == pytest.approx(2.0)  # 4.4 / 2.2: a ratio of the medians
    assert summary["p99_ratio_per_round"] == pytest.approx([1.5, 2.2, 2.0])
    assert summary["p99_ratio_per_round_median"] == pytest.approx(2.0)
    assert summary["runs"] == runs


def test_an_unfinished_round_has_no_per_round_ratio():
    summary = rc.repeat_summary([_run(1, "floor", 2.0), _run(1, "product", 4.0),
                                 _run(2, "floor", 3.0)], {})
    assert summary["count"] == {"floor": 2, "product": 1}
    assert summary["p99_ratio_per_round"] == [2.0]
    assert summary["p99_ratio"] == pytest.approx(4.0 / 2.5)
    nothing = rc.repeat_summary([_run(1, "floor", 2.0)], {})
    assert nothing["p99_ratio"] is None and nothing["p99_ratio_per_round"] == []
    assert nothing["p99_ratio_per_round_median"] is None


def test_the_repeat_table_names_every_median():
    runs = [_run(1, "floor", 2.0), _run(1, "product", 3.0, default_pct=100.0)]
    table = rc.format_repeat_table(rc.repeat_summary(runs, {
        "repeat": 1, "interleave": True, "started_at": "2025-01-01 00:00:00 UTC",
        "load_average_at_start": [0.1, 0.2, 0.3], "load_average_at_end": [0.4, 0.5, 0.6],
        "limits": "contest", "max_requests": 550, "duration_scale": 1.0}))
    for needle in ("--repeat 1", "interleaved", "load 0.10 0.20 0.30 at start",
                   "0.40 0.50 0.60 at end", "floor (1)", "product (1)", "p99 ms",
                   "final score", "inconsistencies", "lag", "% default", "CPU s cgroups",
                   "CPU s k6", "product/floor p99  1.50 x", "/r/01-floor", "/r/01-product"):
        assert needle in table, needle


# --- options ---------------------------------------------------------------------------------


def test_repeat_options():
    args = rc.parse_args(["--repeat", "3"])
    assert args.repeat == 3 and args.interleave is True and not args.floor
    assert rc.parse_args(["--repeat", "2", "--no-interleave"]).interleave is False
    assert rc.parse_args(["--floor"]).floor and rc.parse_args([]).repeat is None
    for bad in (["--repeat", "0"], ["--repeat", "2", "--floor"]):
        with pytest.raises(SystemExit):
            rc.parse_args(bad)


def test_runs_started_within_one_second_get_their_own_folder(tmp_path):
    first = rc._new_dir(tmp_path / "20250101-000000")
    second = rc._new_dir(tmp_path / "20250101-000000")
    third = rc._new_dir(tmp_path / "20250101-000000")
    assert [p.name for p in (first, second, third)] == [
        "20250101-000000", "20250101-000000-2", "20250101-000000-3"]
    assert all(p.is_dir() for p in (first, second, third))


def test_the_table_shows_what_each_instance_says_of_itself_at_the_end():
    result = _result(_k6_summary(), ["api1", "api2", "nginx"])
    result["instances_at_end"] = {
        "api1": {"accepted": 8375, "recorded": 8374, "refusedAsDuplicates": 1,
                 "heldInTable": 0, "inKernelQueue": 0, "difference": 0},
        "api2": {"error": "connection refused"},
    }
    table = rc.format_table(result)
    assert "  api1         8,375     8,374          1      0       0           0" in table
    assert "api2     /status unreadable: connection refused" in table
