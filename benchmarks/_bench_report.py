"""Medians, paired ratios and target verdicts for the benchmark driver (stdlib only)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

UPSTREAM, OURS, FLOOR = "upstream", "ours", "floor"
SIDES = (UPSTREAM, OURS, FLOOR)

# results[(workload, variant)][side] contains one metrics dict per round, or None for a round
# whose worker failed or did not run.
RoundMetrics = Optional[dict[str, float]]
Results = dict[tuple[str, str], dict[str, list[RoundMetrics]]]

# Growth limit that the driver treats as "bounded" for the 1 GiB and 100 MiB memory cases.
# The targets give no number for these. 32 MiB is far below either output size, so an
# implementation that keeps the output or the whole line in memory cannot pass.
BOUNDED_GROWTH_MIB = 32.0


@dataclass(frozen=True)
class Target:
    label: str
    workload: str
    variant: str
    metric: str
    # With "upstream" or "floor" the value is the paired ratio ours/that side. With "absolute"
    # it is the median of ours. Any other value names a variant of the same workload, and the
    # value is the paired ratio of ours in this variant to ours in that one.
    compare_to: str
    limit: float
    at_least: bool = False

    def verdict(self, value: Optional[float]) -> str:
        if value is None or math.isnan(value):
            return "n/a"
        passed = value >= self.limit if self.at_least else value <= self.limit
        return "PASS" if passed else "MISS"

    def limit_text(self) -> str:
        sign = ">=" if self.at_least else "<="
        if self.compare_to == "absolute":
            return f"{sign} {self.limit:g} MiB"
        if self.compare_to in (UPSTREAM, FLOOR):
            return f"{sign} {self.limit:g} x {self.compare_to}"
        return f"{sign} {self.limit:g} x {self.compare_to} sessions"


def _throughput_targets() -> list[Target]:
    targets = []
    for variant in ("plain", "progress", "redaction"):
        targets.append(Target(f"output lines/s, {variant}", "output_throughput", variant,
                              "lines_per_s", UPSTREAM, 2.3, at_least=True))
        targets.append(Target(f"output lines/s, {variant}", "output_throughput", variant,
                              "lines_per_s", FLOOR, 0.8, at_least=True))
    return targets


TARGETS: list[Target] = [
    Target("per-task latency, /bin/true", "task_overhead", "", "median_ms", UPSTREAM, 0.4),
    Target("per-task latency, /bin/true", "task_overhead", "", "median_ms", FLOOR, 2.0),
    Target("per-task latency, python -c pass", "python_task_overhead", "", "median_ms",
           FLOOR, 2.0),
    Target("environment enter + exit", "env_enter_exit", "", "median_ms", UPSTREAM, 0.4),
    *_throughput_targets(),
    Target("TERMINATE cancel latency", "cancel_latency", "terminate", "median_ms", FLOOR, 2.0),
    Target("RSS growth, 200,000 lines", "memory", "lines", "rss_growth_mib", "absolute", 5.0),
    Target("RSS growth, 1 GiB output", "memory", "bytes", "rss_growth_mib", "absolute",
           BOUNDED_GROWTH_MIB),
    Target("RSS growth, one 100 MiB line", "memory", "long_line", "rss_growth_mib", "absolute",
           BOUNDED_GROWTH_MIB),
    Target("CPU per line, 32 vs 1 sessions", "concurrency", "32", "cpu_us_per_line", "1", 1.5),
]


def _values(rounds: list[RoundMetrics], metric: str) -> list[Optional[float]]:
    return [None if metrics is None else metrics.get(metric) for metrics in rounds]


def median_of(rounds: list[RoundMetrics], metric: str) -> Optional[float]:
    present = [value for value in _values(rounds, metric) if value is not None]
    return statistics.median(present) if present else None


def paired_ratios(
    numerators: list[RoundMetrics], denominators: list[RoundMetrics], metric: str
) -> list[float]:
    """Return numerator/denominator for each round in which both sides ran."""
    ratios = []
    for top, bottom in zip(_values(numerators, metric), _values(denominators, metric)):
        if top is not None and bottom is not None and bottom > 0:
            ratios.append(top / bottom)
    return ratios


def paired_ratio(
    numerators: list[RoundMetrics], denominators: list[RoundMetrics], metric: str
) -> Optional[float]:
    """Return the median over rounds of numerator/denominator, using rounds where both ran."""
    ratios = paired_ratios(numerators, denominators, metric)
    return statistics.median(ratios) if ratios else None


def _format(value: Optional[float], ratio: bool = False) -> str:
    if value is None:
        return "n/a"
    if ratio:
        return f"{value:.2f}x"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def metric_names(sides: dict[str, list[RoundMetrics]]) -> list[str]:
    names: list[str] = []
    for rounds in sides.values():
        for metrics in rounds:
            for name in metrics or {}:
                if name not in names:
                    names.append(name)
    return names


def results_table(results: Results) -> str:
    lines = [
        "| workload | variant | metric | upstream | ours | floor | ours/upstream | ours/floor |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (workload, variant), sides in results.items():
        for metric in metric_names(sides):
            empty: list[RoundMetrics] = []
            upstream, ours, floor = (sides.get(side, empty) for side in SIDES)
            cells = [
                _format(median_of(upstream, metric)),
                _format(median_of(ours, metric)),
                _format(median_of(floor, metric)),
                _format(paired_ratio(ours, upstream, metric), ratio=True),
                _format(paired_ratio(ours, floor, metric), ratio=True),
            ]
            lines.append(f"| {workload} | {variant or '-'} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_values(target: Target, results: Results) -> list[float]:
    """Return the per-round values that the target's median is taken over."""
    empty: list[RoundMetrics] = []
    sides = results.get((target.workload, target.variant), {})
    ours = sides.get(OURS, empty)
    if target.compare_to == "absolute":
        return [value for value in _values(ours, target.metric) if value is not None]
    if target.compare_to in (UPSTREAM, FLOOR):
        return paired_ratios(ours, sides.get(target.compare_to, empty), target.metric)
    other = results.get((target.workload, target.compare_to), {}).get(OURS, empty)
    return paired_ratios(ours, other, target.metric)


def targets_table(results: Results) -> str:
    lines = [
        "| target | workload | metric | measured (ours) | rounds min-max | limit | verdict |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for target in TARGETS:
        if (target.workload, target.variant) not in results:
            continue
        values = target_values(target, results)
        value = statistics.median(values) if values else None
        is_ratio = target.compare_to != "absolute"
        spread = "n/a"
        if values:
            spread = f"{_format(min(values), is_ratio)}-{_format(max(values), is_ratio)}"
        name = f"{target.workload}/{target.variant}" if target.variant else target.workload
        lines.append(
            f"| {target.label} | {name} | {target.metric} | {_format(value, is_ratio)} | {spread}"
            f" | {target.limit_text()} | {target.verdict(value)} |"
        )
    return "\n".join(lines)
