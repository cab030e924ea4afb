"""Reference MCP server: a calendar with conflict checks and free-slot search (state per process)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

import datetime as dt

try:
    from ._common import ToolError, new_server
except ImportError:  # run as a script
    from _common import ToolError, new_server

app = new_server("calendar", "A calendar: create, list and cancel events, and find free time.")
_events: dict[str, dict] = {}
_next = [1]


def _date(s: str) -> dt.date:
    try:
        return dt.date.fromisoformat(s)
    except (TypeError, ValueError):
        raise ToolError(f"date {s!r} must be YYYY-MM-DD") from None


def _minutes(s: str) -> int:
    try:
        h, m = s.split(":")
        h, m = int(h), int(m)
    except (AttributeError, ValueError):
        raise ToolError(f"time {s!r} must be HH:MM") from None
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ToolError(f"time {s!r} is not a time of day")
    return h * 60 + m


def _hhmm(m: int) -> str:
    return f"{m // 60:02d}:{m % 60:02d}"


def _day(date: str) -> list[dict]:
    return sorted((e for e in _events.values() if e["date"] == date), key=lambda e: e["start_min"])


def _public(e: dict) -> dict:
    return {k: v for k, v in e.items() if not k.endswith("_min")}


@app.tool(description="Create an event. Refuses one that overlaps an existing event unless allow_overlap is true.")
def create_event(title: Annotated[str, Field(description="what the event is")],
                 date: Annotated[str, Field(description="YYYY-MM-DD")],
                 start: Annotated[str, Field(description="start time HH:MM (24 h)")],
                 duration_minutes: Annotated[int, Field(description="length in minutes, 5 to 1440")],
                 attendees: Annotated[list[str] | None, Field(description="names or emails")] = None,
                 allow_overlap: Annotated[bool, Field(description="book even if it overlaps")] = False) -> dict:
    d = _date(date).isoformat()
    s = _minutes(start)
    if not 5 <= duration_minutes <= 24 * 60:
        raise ToolError("duration_minutes must be between 5 and 1440")
    e_min = s + duration_minutes
    if e_min > 24 * 60:
        raise ToolError("the event must end on the same day")
    if not title.strip():
        raise ToolError("title must not be empty")
    clash = [e for e in _day(d) if e["start_min"] < e_min and s < e["end_min"]]
    if clash and not allow_overlap:
        c = clash[0]
        raise ToolError(f"conflicts with {c['id']} '{c['title']}' {c['start']}-{c['end']} on {d}")
    eid = f"evt{_next[0]}"
    _next[0] += 1
    _events[eid] = {"id": eid, "title": title, "date": d, "start": _hhmm(s), "end": _hhmm(e_min),
                    "attendees": list(attendees or []), "start_min": s, "end_min": e_min}
    return {"created": _public(_events[eid])}


@app.tool(description="List events between two dates (inclusive; one date if date_to is omitted).")
def list_events(date_from: Annotated[str, Field(description="first date, YYYY-MM-DD")],
                date_to: Annotated[str | None, Field(description="last date (default: date_from)")] = None) -> dict:
    a = _date(date_from)
    b = _date(date_to) if date_to else a
    if b < a:
        raise ToolError("date_to is before date_from")
    evs = sorted((e for e in _events.values() if a <= dt.date.fromisoformat(e["date"]) <= b),
                 key=lambda e: (e["date"], e["start_min"]))
    return {"events": [_public(e) for e in evs], "count": len(evs)}


@app.tool(description="Cancel an event by its id.")
def cancel_event(event_id: Annotated[str, Field(description="the id create_event returned, e.g. evt3")]) -> dict:
    e = _events.pop(event_id, None)
    if e is None:
        raise ToolError(f"no event {event_id!r}; list_events shows the ids")
    return {"cancelled": _public(e)}


@app.tool(description="Find the first free slot of a given length on a date, between earliest and latest (HH:MM).")
def find_free_slot(date: Annotated[str, Field(description="YYYY-MM-DD")],
                   duration_minutes: Annotated[int, Field(description="length of the slot in minutes")],
                   earliest: Annotated[str, Field(description="HH:MM")] = "09:00",
                   latest: Annotated[str, Field(description="HH:MM")] = "18:00") -> dict:
    d = _date(date).isoformat()
    lo, hi = _minutes(earliest), _minutes(latest)
    if duration_minutes <= 0 or lo + duration_minutes > hi:
        raise ToolError("no room for that duration between earliest and latest")
    t = lo
    for e in _day(d):
        if e["start_min"] - t >= duration_minutes:
            break
        t = max(t, e["end_min"])
    if t + duration_minutes > hi:
        return {"date": d, "free": None, "reason": "fully booked in that window"}
    return {"date": d, "free": {"start": _hhmm(t), "end": _hhmm(t + duration_minutes)}}


if __name__ == "__main__":
    app.run("stdio")
