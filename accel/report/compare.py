"""``compare``: a regression between two reports only where it exceeds the noise of both runs."""

from __future__ import annotations


def _metric(scenario: str, sa: dict, sb: dict) -> str:
    """What `compare` judges (lower is better). SingleStream and Offline: the median latency per
    query (MLPerf's SingleStream p90 needs 53 calls for a 95% interval; the median 8).
    Server: p99 of query latency where both runs have enough queries for its interval, else
    the median."""
    if scenario == "server" and sa.get("p99_ci") and sb.get("p99_ci"):
        return "p99"
    return "p50"


DEFAULT_THRESHOLD = 0.10
"""Run-to-run drift that one run cannot see; 10% is asv's default factor (1.1). Consecutive
identical profiles on the shared 2-core CI machine differed by 3% to 22% in medians whose
intervals did not overlap (docs/BENCHMARKS.md): set it from your machine's own drift."""


def compare(a: dict, b: dict, threshold: float = DEFAULT_THRESHOLD) -> tuple[list[dict], list[str]]:
    """Per scenario and workload in both reports: B's headline latency against A's. A regression
    is B worse than A beyond the noise of both runs: B's 95% interval lies wholly above A's (the
    sampling noise of each run's statistic), and the relative change exceeds each run's
    coefficient of variation (the spread of one call) and ``threshold`` (the drift between runs
    that neither run can measure). An improvement is the mirror image. A Server run that leaves
    queries unserved where the baseline served them all is a regression whatever its latency.
    Also notes that make the comparison suspect: other targets, machines, batches or rates."""
    rows, notes = [], []
    for scenario in ("single_stream", "offline", "server"):
        sa, sb = a["scenarios"].get(scenario), b["scenarios"].get(scenario)
        if not sa or not sb:
            continue
        for key in ("batch", "rate_qps"):
            if sa.get(key) != sb.get(key):
                notes.append(f"{scenario}: {key} {sa.get(key)} in A, {sb.get(key)} in B")
        for name in sa["results"]:
            if name not in sb["results"]:
                continue
            ra, rb = sa["results"][name], sb["results"][name]
            newly_unserved = scenario == "server" and rb["unserved"] > 0 and ra["unserved"] == 0
            if ra["latency_ms"] is None or rb["latency_ms"] is None:
                notes.append(f"{scenario}, {name}: a run served no query, no latency to compare")
                continue
            sta, stb = ra["latency_ms"], rb["latency_ms"]
            metric = _metric(scenario, sta, stb)
            va, vb, ca, cb = sta[metric], stb[metric], sta[f"{metric}_ci"], stb[f"{metric}_ci"]
            change = vb / va - 1
            floor = max(threshold, sta["cv"], stb["cv"])
            if newly_unserved:
                verdict = "regression"
                notes.append(f"{scenario}, {name}: {rb['unserved']} queries left unserved")
            elif ca is None or cb is None:
                verdict = "too few samples"
            elif cb[0] > ca[1] and change > floor:
                verdict = "regression"
            elif cb[1] < ca[0] and -change > floor:
                verdict = "improvement"
            else:
                verdict = "within noise"
            rows.append(
                dict(
                    scenario=scenario,
                    workload=name,
                    metric=metric,
                    a=va,
                    a_ci=ca,
                    b=vb,
                    b_ci=cb,
                    change=change,
                    noise_floor=floor,
                    verdict=verdict,
                )
            )
    if a["target"]["fingerprint"] != b["target"]["fingerprint"]:
        notes.append(
            f"the reports are for different targets ({a['target']['name']} "
            f"{a['target']['fingerprint']}, {b['target']['name']} {b['target']['fingerprint']})"
        )
    ea, eb = a["environment"], b["environment"]
    if (ea.get("cpu"), _gpu_names(ea)) != (eb.get("cpu"), _gpu_names(eb)):
        notes.append(
            f"measured on different machines ({ea.get('cpu')} {_gpu_names(ea)} vs "
            f"{eb.get('cpu')} {_gpu_names(eb)})"
        )
    return rows, notes


def _gpu_names(env: dict) -> list[str]:
    return [g["name"] for g in env.get("gpus") or []]


def compare_markdown(rows: list[dict], notes: list[str]) -> str:
    lines = [
        "| scenario | workload | metric | A (ms) [95% CI] | B (ms) [95% CI] | change | noise "
        "floor | verdict |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]

    def ci(c) -> str:
        return "[too few samples]" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"

    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['workload']} | {r['metric']} | {r['a']:.3f} {ci(r['a_ci'])} "
            f"| {r['b']:.3f} {ci(r['b_ci'])} | {r['change']:+.1%} | {r['noise_floor']:.1%} | "
            f"{r['verdict']} |"
        )
    lines += [f"\nnote: {n}" for n in notes]
    return "\n".join(lines)
