"""Merge schedules: the cutoffs of one merged variant, written "15" for one stage or "7+15" for two ("15+15" merges
twice at layer 15: groups of up to four tokens)."""

from __future__ import annotations

Schedule = tuple[int, ...]

BASE = "base"


def label(schedule: Schedule) -> str:
    return "+".join(str(c) for c in schedule) if schedule else BASE


def parse(text: str) -> list[Schedule]:
    """"0,7,15,7+15" -> [(0,), (7,), (15,), (7, 15)]. Spaces are ignored."""
    schedules = []
    for item in text.replace(" ", "").split(","):
        if item:
            try:
                schedules.append(tuple(sorted(int(c) for c in item.split("+"))))
            except ValueError:
                raise ValueError(f"bad cutoff schedule {item!r}: write layers as 15, or 7+15 for two stages") from None
    if not schedules:
        raise ValueError("no cutoff schedule given")
    return schedules


def check(schedules: list[Schedule], num_layers: int) -> None:
    for schedule in schedules:
        if not schedule or any(not 0 <= c <= num_layers for c in schedule):
            raise ValueError(f"cutoff schedule {label(schedule)!r} is out of range: layers are 0 to {num_layers}")


def speed_defaults(num_layers: int, quick: bool) -> list[Schedule]:
    """0, N/4, N/2, 3N/4 and two multi-stage schedules; --quick keeps N/2 and one two-stage schedule."""
    quarter, half, three_quarters = num_layers // 4, num_layers // 2, 3 * num_layers // 4
    if quick:
        return _unique([(half,), (quarter, half)])
    return _unique([(0,), (quarter,), (half,), (three_quarters,), (quarter, half), (quarter, half, three_quarters)])


def fidelity_defaults(num_layers: int, quick: bool) -> list[Schedule]:
    """Every ~N/10 layers from 0 to N (N merges after the last layer: must equal the base), plus two-stage ones;
    --quick keeps N/2 and 3N/4."""
    half, three_quarters = num_layers // 2, 3 * num_layers // 4
    if quick:
        return _unique([(half,), (three_quarters,)])
    step = max(1, round(num_layers / 10))
    singles = [(c,) for c in range(0, num_layers, step)] + [(num_layers,)]
    return _unique([*singles, (num_layers // 4, half), (half, three_quarters)])


def _unique(schedules: list[Schedule]) -> list[Schedule]:
    seen, out = set(), []
    for schedule in schedules:
        schedule = tuple(sorted(set(schedule)))
        if schedule not in seen:
            seen.add(schedule)
            out.append(schedule)
    return out
