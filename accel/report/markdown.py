"""The Markdown summary of a report."""

from __future__ import annotations

import numpy as np


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def markdown(report: dict) -> str:
    t, env = report["target"], report["environment"]
    budget = t.get("latency_budget_ms")
    lines = [
        f"# accel report: target `{t['name']}`",
        "",
        f"Target fingerprint {t['fingerprint']}; latency budget "
        f"{f'{budget:g} ms (SingleStream p90)' if budget else 'none'}. "
        + _harness_line(report["harness"]),
        "",
    ]
    if report.get("quality"):
        lines += _quality_lines(report)
    if report.get("speedup_end_to_end_p50"):
        lines += [
            f"End-to-end speedup of the student engine over the teacher in eager torch "
            f"(SingleStream p50): **{report['speedup_end_to_end_p50']:.1f}x**.",
            "",
        ]
    for scenario in ("single_stream", "offline"):
        s = report["scenarios"].get(scenario)
        if not s:
            continue
        title = "SingleStream (p90)" if scenario == "single_stream" else "Offline (throughput)"
        lines += [
            f"## {title}, batch {s['batch']}: latency per query (ms)",
            "",
            "| workload | p50 | p90 | p95 | p99 | min | max | mean | CV | n (warm-up) | "
            "images/s | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in s["results"].items():
            st, mem = r["latency_ms"], r["memory"]
            lines.append(
                f"| {name} | {_ms(st['p50'])} | {_ms(st['p90'])} | {_ms(st['p95'])} | "
                f"{_ms(st['p99'])} | {_ms(st['min'])} | {_ms(st['max'])} | {_ms(st['mean'])} | "
                f"{st['cv']:.1%} | {st['n']} ({r['warmup']['iterations']}) | "
                f"{r['images_per_s']:.1f} | {mem.get('host_rss_peak_mib', float('nan')):.0f} |"
            )
        if s["ratios"]:
            lines += [
                "",
                "Pairwise, from the interleaved rounds (baseline time / subject time):",
                "",
                "| baseline | subject | ratio of medians | paired median [95% CI] |",
                "|---|---|---:|---:|",
            ]
            for r in s["ratios"]:
                lines.append(
                    f"| {r['baseline']} | {r['subject']} | {r['ratio_of_medians']:.2f}x | "
                    f"{r['paired_median']:.2f}x "
                    + (
                        f"[{r['paired_ci'][0]:.2f}, {r['paired_ci'][1]:.2f}] |"
                        if r["paired_ci"]
                        else "[too few rounds] |"
                    )
                )
        lines.append("")
    s = report["scenarios"].get("server")
    if s:
        lines += [
            f"## Server: Poisson arrivals, {s['rate_qps']:g} queries/s for {s['duration_s']:g} s, "
            f"batch {s['batch']} (latency includes queueing)",
            "",
            "| workload | queries | unserved | achieved q/s | utilization | p50 | p99 | bound | "
            "p99 within bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in s["results"].items():
            st = r["latency_ms"] or {}
            lines.append(
                f"| {name} | {r['queries']} | {r['unserved']} | {r['achieved_qps']:.1f} | "
                f"{r['utilization']:.0%} | {_ms(st.get('p50', float('nan')))} | "
                f"{_ms(st.get('p99', float('nan')))} | {r['bound_ms'] or '-'} | "
                f"{'-' if r['p99_within_bound'] is None else 'yes' if r['p99_within_bound'] else 'NO'} |"
            )
        lines.append("")
    if report.get("budget"):
        b = report["budget"]
        lines += [f"## Latency budget: {b['latency_budget_ms']:g} ms at SingleStream p90", ""]
        lines += [
            f"- {name}: p90 {_ms(r['p90_ms'])} ms, {'within budget' if r['met'] else 'OVER budget'}"
            for name, r in b["results"].items()
        ]
        lines.append("")
    lines += _breakdown_lines(report["breakdown"])
    lines += _chain_lines(report.get("chain") or [])
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    gpus = env.get("gpus") or []
    lines += [
        "## Environment",
        "",
        f"{env['cpu']}, {env['logical_cores']} logical cores ({env.get('affinity_cores')} usable), "
        f"torch threads {env.get('threads')}; SIMD: {' '.join(env['cpu_flags']) or 'unknown'}; "
        f"{env['platform']}, Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
    ]
    for g in gpus:
        clocks = g.get("clocks") or {}
        sm = clocks.get("sm_mhz") or {}
        lines.append(
            f"GPU {g['index']}: {g['name']}, compute capability {g['compute_capability']}, "
            f"driver {g['driver']}, SM clock {sm.get('current')}/{sm.get('max')} MHz, power "
            f"{g.get('power_w')}/{g.get('power_limit_w')} W, throttle reasons "
            f"{', '.join(g.get('throttle_reasons') or []) or 'none'}."
        )
    return "\n".join(lines) + "\n"


def _chain_lines(chain: list[dict]) -> list[str]:
    """The stages that made the engine: wall time and peak memory of each."""
    if not chain:
        return []

    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if row.get(key) is not None else "-"

    lines = [
        "## The chain: what each stage cost",
        "",
        "| stage | key | wall s | peak RSS MB | peak child RSS MB | peak GPU MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in chain:
        lines.append(
            f"| {r['stage']} | {r['key'][:12]} | {cell(r, 'wall_seconds', '.1f')} | "
            f"{cell(r, 'peak_rss_mb', '.0f')} | {cell(r, 'peak_child_rss_mb', '.0f')} | "
            f"{cell(r, 'peak_gpu_mb', '.0f')} |"
        )
    return [*lines, ""]


def _harness_line(h: dict) -> str:
    count = (
        f"{h['iterations']} iterations"
        if h.get("iterations")
        else (f"{h['duration_ms']:g} ms per workload and at least {h['min_iterations']} iterations")
    )
    return (
        f"Harness: warm-up {h['warmup_iterations']} calls and {h['warmup_ms']:g} ms per workload, "
        f"then {count}, workloads interleaved; timer: "
        f"{'CUDA events' if h['timer'] == 'cuda' else 'perf_counter_ns'}."
    )


def _quality_lines(report: dict) -> list[str]:
    lines = ["## Quality", ""]
    if "quality_seeds" in report:
        floor = report.get("fd_floor")
        lines += [
            f"Mean of seeds {report['quality_seeds']}, {report['quality_samples']} samples each."
            + (f" FD-digits floor (two halves of the real digits): {floor:.3f}." if floor else ""),
            "",
        ]
    lines += ["| sampler | FD-digits | class accuracy |", "|---|---:|---:|"]
    for name, v in report["quality"].items():
        lines.append(f"| {name} | {v['fd_digits']:.3f} | {100 * v['class_accuracy']:.1f}% |")
    return lines + [""]


def _breakdown_lines(breakdown: dict) -> list[str]:
    if not breakdown:
        return []
    pixels = not any("vae decode" in sections for sections in breakdown.values())
    lines = [
        "## Per-stage breakdown of one SingleStream query (ms, p50 over the recorded calls)",
        "",
        "Copies (h2d, d2h) and compute are parts of the denoising step they happen in."
        + (" There is no VAE decode: the model samples pixels." if pixels else ""),
        "",
    ]
    for name, sections in breakdown.items():
        steps = {k: v for k, v in sections.items() if k.startswith("step ")}
        if len(steps) > 8:  # many steps: their total and spread instead of one entry each
            p50s = [v["p50"] for v in steps.values()]
            shown = {k: _ms(v["p50"]) for k, v in sections.items() if k not in steps}
            shown = {
                f"{len(steps)} denoising steps": f"{_ms(sum(p50s))} (per step {_ms(min(p50s))}"
                f"-{_ms(max(p50s))}, median {_ms(float(np.median(p50s)))})",
                **shown,
            }
        else:
            shown = {k: _ms(v["p50"]) for k, v in sections.items()}
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    return lines + [""]
