"""A resumable results directory: settings.json, results.jsonl (one record per problem),
summary.json; plus summary statistics and a printable table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from s2t_edge.errors import S2TError
from s2t_edge.locks import lock_folder

SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
_Z95 = 1.959963984540054
_UNSET = object()


class RunSettings(Mapping[str, Any]):
    """Read-only settings of a run (model sha256/name, policy, k, max_tokens, data, seed...).

    Any JSON-able dict is accepted; it is normalised through JSON so that it compares equal
    to the same settings read back from settings.json.
    """

    def __init__(self, settings: Mapping[str, Any]):
        try:
            self._d: dict[str, Any] = json.loads(json.dumps(dict(settings), sort_keys=True))
        except (TypeError, ValueError) as e:
            raise S2TError(f"run settings are not JSON-able ({e})") from None

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"RunSettings({self._d!r})"

    def diff(self, other: Mapping[str, Any]) -> list[str]:
        """Human-readable differences, "key <self value> != <other value>", sorted by key."""
        out = []
        for k in sorted(set(self._d) | set(other)):
            a, b = self._d.get(k, _UNSET), other.get(k, _UNSET)
            if a != b:
                out.append(f"{k} {_show(a)} != {_show(b)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._d))


def _show(v: Any) -> str:
    return "<unset>" if v is _UNSET else repr(v)


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Records of a results.jsonl ([] if missing). An unterminated last line (a crash
    mid-write) is ignored if it is not valid JSON; with `repair` the file is cut back to the
    last complete line (or the line is terminated if it was complete JSON)."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    cut = data.rfind(b"\n") + 1  # bytes up to the last newline are complete lines
    records: list[dict] = []
    for i, raw in enumerate(data[:cut].split(b"\n")[:-1], start=1):
        if raw.strip():
            rec = _parse_record(raw)
            if rec is None:
                raise S2TError(f"{p}:{i}: corrupt result line; delete it or use another --out")
            records.append(rec)
    tail = data[cut:]
    if tail.strip():
        rec = _parse_record(tail)
        if rec is not None:
            records.append(rec)
        if repair and rec is not None:
            with p.open("ab") as f:
                f.write(b"\n")
        elif repair:
            with p.open("r+b") as f:
                f.truncate(cut)
    return records


def _parse_record(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def wilson(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp to p: rounding can put a bound a few ulps on the wrong side of p (e.g. 5e-17 at p=0)
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def summarize(records: list[dict], policy: str | None = None) -> dict[str, Any]:
    """Summary numbers over records (duplicate ids: the first one counts).

    Rates with a zero denominator are None. Missing tokens/seconds/triggers/flips count as 0.
    """
    seen: set[str] = set()
    recs = []
    for r in records:
        rid = str(r.get("id"))
        if rid not in seen:
            seen.add(rid)
            recs.append(r)
    n = len(recs)
    correct = sum(1 for r in recs if r.get("correct"))
    tokens = sum(float(r.get("tokens") or 0) for r in recs)
    seconds = sum(float(r.get("seconds") or 0) for r in recs)
    triggers = sum(float(r.get("triggers") or 0) for r in recs)
    truncated = sum(1 for r in recs if r.get("truncated"))
    flips = sum(float(r.get("flips") or 0) for r in recs)
    lo, hi = wilson(correct, n)
    if policy is None and recs:
        policy = recs[0].get("policy")
    return {
        "policy": policy,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "ci_lo": lo,
        "ci_hi": hi,
        "mean_tokens": tokens / n if n else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "wall_seconds": seconds,
        "s_per_problem": seconds / n if n else None,
        "trigger_rate": triggers / tokens if tokens else None,
        "flip_rate": flips / tokens if tokens else None,
        "truncated": truncated,
    }


class ResultsDir:
    """An output directory for one run; refuses to mix results from different settings."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = settings if isinstance(settings, RunSettings) else RunSettings(settings)
        if self.path.exists() and not self.path.is_dir():
            raise S2TError(f"--out {self.path} is a file, not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(self.path)
        sfile = self.path / SETTINGS_FILE
        self.results_file = self.path / RESULTS_FILE
        if not sfile.exists() and self.results_file.exists() and self.results_file.stat().st_size:
            self.close()
            raise S2TError(
                f"{self.path} holds results but no {SETTINGS_FILE}: cannot tell their settings; use another --out"
            )
        if sfile.exists():
            try:
                old = json.loads(sfile.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                self.close()
                raise S2TError(f"{sfile} is not readable JSON; use another --out") from None
            diffs = (
                RunSettings(old).diff(self.settings) if isinstance(old, dict) else ["settings.json is not an object"]
            )
            if diffs:
                self.close()
                raise S2TError(f"out dir holds results from different settings: {', '.join(diffs)}; use another --out")
        else:
            _write_json(sfile, self.settings.to_dict())
        read_records(self.results_file, repair=True)  # so appends start on a fresh line

    def close(self) -> None:
        """Release the folder's lock (also released when the process ends, even by kill -9)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def records(self) -> list[dict]:
        """All complete records written so far."""
        return read_records(self.results_file, repair=True)

    def done_ids(self) -> set[str]:
        """Ids of problems already done (to skip on resume)."""
        return {str(r["id"]) for r in self.records() if "id" in r}

    def append(self, record: dict) -> None:
        """Write one record as a JSON line, flushed and fsynced."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.results_file.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def summary(self) -> dict[str, Any]:
        """Summary of the records so far; also written to summary.json."""
        s = summarize(self.records(), policy=self.settings.get("policy"))
        _write_json(self.path / SUMMARY_FILE, s)
        return s


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    """Plain aligned text table of summary rows; "cost×" is s/problem relative to the
    'greedy' row (blank without one, or for a run decoded with another `--batch`: a batched
    problem's seconds are its share of the batch, not comparable with a lone decode); rows from
    `compare_runs` also show the problems each policy solved that greedy did not (+), the
    reverse (-) and the exact McNemar p-value."""
    greedy = next((r for r in rows if r.get("policy") == "greedy"), None)
    base = greedy.get("s_per_problem") if greedy else None
    header = [
        "policy",
        "n",
        "accuracy [95% CI]",
        "mean tokens",
        "tok/s",
        "s/problem",
        "trigger rate",
        "flip rate",
        "cost×",
    ]
    paired = any("wins_vs_greedy" in r for r in rows)
    if paired:
        header.append("vs greedy (+/-, p)")
    body = []
    blanked = False
    for r in rows:
        acc = r.get("accuracy")
        acc_s = "-" if acc is None else (f"{100 * acc:.1f}% [{100 * r['ci_lo']:.1f}, {100 * r['ci_hi']:.1f}]")
        spp = r.get("s_per_problem")
        comparable = greedy is not None and _batch(r) == _batch(greedy)
        cost = f"{spp / base:.2f}×" if base and spp is not None and comparable else "-"
        blanked = blanked or (base is not None and not comparable)
        body.append(
            [
                str(r.get("policy") or "?"),
                str(r.get("n", 0)),
                acc_s,
                _fmt(r.get("mean_tokens"), ".1f"),
                _fmt(r.get("tokens_per_s"), ".1f"),
                _fmt(spp, ".2f"),
                _fmt(r.get("trigger_rate"), ".4f"),
                _fmt(r.get("flip_rate"), ".4f"),
                cost,
            ]
        )
        if paired:
            w = r.get("wins_vs_greedy")
            body[-1].append("-" if w is None else f"+{w}/-{r['losses_vs_greedy']}, p={r['p_vs_greedy']:.2f}")
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    note = ["(cost× left blank where a run used another --batch than greedy's: not comparable)"] if blanked else []
    return "\n".join([line(header), rule, *(line(b) for b in body), *note])


def _batch(row: dict) -> int:
    """The `--batch` a compared run was decoded with (1 when it was not batched)."""
    return int((row.get("settings") or {}).get("batch", 1))
