"""The record of `bash .ci/gpu`: one budget, stages with deadlines, results written as they come.

Every check, measurement and note is appended to OUT/gpu_results.jsonl (and printed) the moment
it finishes, so a run cut short keeps everything it did. OUT/gpu_report.json and
OUT/gpu_report.md are rewritten from those records at the end, and also by the watchdog
that ends the process when the budget runs out. The budget (default 480 s) starts when
`.ci/gpu` starts, so the install and the extension build count against it.

Deadlines: each stage gets a share of the time left when it starts (shares of the stages
still to run, so time a stage did not use goes to the later ones). A check that starts after
its stage's deadline, or whose own estimate `need_s` would run past the budget, is skipped
with a note; a check that raises `Skip` is skipped with its reason. Neither counts as passed.

    python bench/gpu_report.py --summarize OUT   # the report and last line from OUT's JSON lines
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager

__all__ = ["Report", "Skip", "summary_line", "write_reports", "RESULTS"]

RESULTS = "gpu_results.jsonl"
RESERVE_S = 10.0  # kept back from the last stage for the reports and the last line


class Skip(Exception):
    """Raised by a check that cannot run here: reported as skipped, with the message as why."""


class Report:
    """Checks, measurements and notes of one run, each written to OUT as soon as it exists."""

    def __init__(self, out: str, dry: bool, device: str, budget_s: float, started_at: float | None = None,
                 reserve_s: float = RESERVE_S):
        self.out, self.dry, self.device, self.reserve_s = out, dry, device, reserve_s
        self.t0 = started_at if started_at is not None else time.time()
        self.budget_s = budget_s
        self.end = self.t0 + budget_s
        self.records: list[dict] = []
        self.info: dict = {}
        self.stage_name, self.deadline, self.current = "setup", self.end, ""
        self._lock = threading.RLock()
        self._file = open(os.path.join(out, RESULTS), "a", encoding="utf-8")
        self._watchdog: threading.Timer | None = None

    # ------------------------------------------------------------------ time
    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        """Seconds of the whole budget left (reserve excluded)."""
        return self.end - self.reserve_s - time.time()

    def start_watchdog(self) -> None:
        """At the end of the budget: note what was running, write the reports, exit 3."""
        def fire():
            with self._lock:
                self.record("note", f"budget of {self.budget_s:.0f} s exhausted during {self.stage_name}: "
                                    f"{self.current or 'between checks'}; the process was ended",
                            outcome="failed")
                self.finish()
                os._exit(3)
        self._watchdog = threading.Timer(max(1.0, self.end - time.time()), fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    # ------------------------------------------------------------------ records
    def record(self, kind: str, name: str, **entry) -> dict:
        """Append one record to the JSON lines file and print it."""
        with self._lock:
            entry = {"kind": kind, "stage": self.stage_name, "name": name, **entry,
                     "t": round(self.elapsed(), 1)}
            self.records.append(entry)
            self._file.write(json.dumps(entry, default=str) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            tag = entry.get("outcome", kind)
            extra = entry.get("value") or entry.get("why") or entry.get("error") or ""
            print(f"[{tag}] {name}" + (f" ({entry['seconds']} s)" if "seconds" in entry else "")
                  + (f": {str(extra)[:300]}" if extra else ""), flush=True)
            return entry

    def note(self, text: str) -> None:
        self.record("note", text)

    def measurement(self, name: str, value: str, **detail) -> None:
        self.record("measurement", name, value=value, **detail)

    def check(self, name: str, fn, *args, need_s: float = 0.0) -> dict | None:
        """Run `fn(*args)` as a check: passed (its return value as details), failed, or skipped."""
        if time.time() > self.deadline:
            self.record("check", name, outcome="skipped", why=f"past the deadline of stage {self.stage_name}")
            return None
        if need_s > self.left():
            self.record("check", name, outcome="skipped",
                        why=f"needs about {need_s:.0f} s, {max(0.0, self.left()):.0f} s of the budget left")
            return None
        start, self.current = time.time(), name
        try:
            details = fn(*args) or {}
            entry = {"outcome": "passed", "details": details}
        except Skip as why:
            entry = {"outcome": "skipped", "why": str(why)}
        except Exception as exc:  # a failed check is reported, the others still run
            entry = {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                     "traceback": traceback.format_exc()[-3000:]}
        self.current = ""
        out = self.record("check", name, seconds=round(time.time() - start, 2), **entry)
        if self.device == "cuda":
            import torch
            torch.cuda.empty_cache()
        return out.get("details")

    @contextmanager
    def stage(self, name: str, share: float, later_shares: float):
        """Run a stage with a deadline: `share` of the time left, against the shares still to come."""
        left = self.left()
        self.stage_name = name
        if left <= 0:
            self.record("stage", name, outcome="skipped", why="the budget is spent")
            self.deadline = 0.0
        else:
            self.deadline = time.time() + left * share / (share + later_shares)
            self.record("stage", name, value=f"starts; deadline in {self.deadline - time.time():.0f} s")
        start = time.time()
        try:
            yield self.deadline > 0
        finally:
            if self.deadline > 0:
                self.record("stage", f"{name} done", seconds=round(time.time() - start, 1))
            self.stage_name = f"after {name}"

    # ------------------------------------------------------------------ end
    def finish(self) -> str:
        """Write gpu_report.json/md and print the last line; returns that line."""
        with self._lock:
            if self._watchdog is not None and threading.current_thread() is not self._watchdog:
                self._watchdog.cancel()
            self.info.update(seconds=round(self.elapsed(), 1), budget_s=self.budget_s, dry_run=self.dry)
            line = write_reports(self.out, self.records, self.info, self.dry)
            print(line, flush=True)
            return line

    def failed(self) -> list[str]:
        return [r["name"] for r in self.records if r.get("outcome") == "failed"]


def summary_line(records: list[dict], seconds: float, out: str) -> str:
    """The last line: how many checks passed, failed, were skipped (the failed and skipped named)."""
    by = {k: [r["name"] for r in records if r.get("kind") in ("check", "note", "stage") and r.get("outcome") == k]
          for k in ("passed", "failed", "skipped")}
    names = lambda xs: "; ".join(xs[:12]) + (f"; +{len(xs) - 12} more" if len(xs) > 12 else "")  # noqa: E731
    parts = [f"{len(by['passed'])} passed", f"{len(by['failed'])} failed" + (f" ({names(by['failed'])})"
                                                                             if by["failed"] else ""),
             f"{len(by['skipped'])} skipped" + (f" ({names(by['skipped'])})" if by["skipped"] else "")]
    return f"gpu check: {', '.join(parts)} in {seconds:.0f} s; results in {out}"


def write_reports(out: str, records: list[dict], info: dict, dry: bool) -> str:
    seconds = info.get("seconds", records[-1]["t"] if records else 0.0)
    line = summary_line(records, seconds, out)
    with open(os.path.join(out, "gpu_report.json"), "w") as f:
        json.dump({"info": info, "records": records, "summary": line}, f, indent=1, default=str)
    md = [f"# gradmap GPU check{' (dry run: CPU, Triton interpreter, tiny shapes)' if dry else ''}", "",
          f"- device: {info.get('device')}", f"- versions: {info.get('versions')}",
          f"- budget: {info.get('budget_s')} s, used {seconds} s", f"- {line}", "",
          "| t (s) | stage | kind | name | outcome / value | detail |", "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        what = r.get("outcome") or r.get("value", "")
        detail = r.get("why") or r.get("error") or r.get("detail") or ("" if r["kind"] != "check"
                                                                        else r.get("details", ""))
        md.append(f"| {r['t']} | {r['stage']} | {r['kind']} | {r['name']} | {what} | "
                  f"{str(detail)[:200].replace('|', '/')} |")
    with open(os.path.join(out, "gpu_report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description="write the reports and the last line from OUT/gpu_results.jsonl")
    ap.add_argument("--summarize", metavar="OUT", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--why", default="", help="a note to add first (e.g. the process was killed)")
    args = ap.parse_args()
    path = os.path.join(args.summarize, RESULTS)
    records = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    if args.why:
        records.append({"kind": "note", "stage": "end", "name": args.why, "outcome": "failed",
                        "t": records[-1]["t"] if records else 0.0})
    print(write_reports(args.summarize, records, {"seconds": records[-1]["t"] if records else 0.0},
                        args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
