"""What a run's decision log says, for the scientist after (or during) the run: `lcls-hitfinder summary`.

The numbers the live status line and the run end message give, taken again from the record itself (every
decision, whatever the subscribers missed), a CSV of the events to review and pick references from
(`bank pick --picks`), and a picture of the run: how the labels went over its events, and the scores.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcls_hitfinder.labels import Label, label_of_count
from lcls_hitfinder.service.messages import ENDED
from lcls_hitfinder.verdicts import PREFILTER

ROLLING = 100  # events a point of the label fractions in the picture stands for

CSV_COLUMNS = ("run", "event", "timestamp", "label", "score")  # bank pick's keys and the label to correct


@dataclass(frozen=True)
class RunSummary:
    """The run as its decision log has it."""

    experiment: str
    run: int
    events: int
    counts: dict[str, int]  # by label
    prefilter: int  # blanks the pre-filter decided: the bank never judged them
    keep: int
    seq_gaps: int  # holes in `seq`: a log that missed decisions (it failed and was abandoned mid-run)
    duration_s: float  # from the first decision to the last
    first_batch: int  # decisions made with the first (a batch's share one time): not in the rate's interval
    latency_ms: tuple[float, float] | None  # p50, p99
    truth_agree: tuple[int, int] | None  # labels equal to the truth's, of the decided events whose truth is known
    complete: bool
    ended: str | None
    dropped: int  # events of the run read but never decided (the log's attribute, set when it closes)

    @property
    def rate_hz(self) -> float | None:
        return (self.events - self.first_batch) / self.duration_s if self.duration_s > 0 else None

    def lines(self) -> list[str]:
        """The summary as a user reads it."""
        if self.complete:
            state = f"complete: {ENDED.get(self.ended or '', 'the run ended')} ({self.ended})"
        else:
            state = "still being written, or its service died"
        out = [f"{self.experiment}:{self.run}: {self.events} decisions, log {state}"]
        if self.dropped:
            out.append(
                f"{self.dropped} events read but never decided (dropped: hitfinder_dropped_events_total says why)"
            )
        if self.events:
            counts = ", ".join(f"{label} {n}" for label, n in self.counts.items())
            out.append(f"labels: {counts}; kept {self.keep} ({100 * self.keep / self.events:.1f}%)")
            judged = self.events - self.prefilter - self.counts[Label.ERROR.text]
            if judged:
                single = self.counts[Label.SINGLE.text]
                out.append(
                    f"the bank judged {judged} (the pre-filter called {self.prefilter} blank): {single} single, "
                    f"{single / judged:.3g} of them (bank build --single-fraction, as this bank sees it)"
                )
        if self.rate_hz is not None:
            out.append(f"{self.duration_s:.1f} s from the first decision to the last: {self.rate_hz:.1f} Hz")
        if self.latency_ms is not None:
            out.append(f"latency p50 {self.latency_ms[0]:.2f} ms, p99 {self.latency_ms[1]:.2f} ms")
        if self.truth_agree is not None:
            agree, known = self.truth_agree
            out.append(f"agrees with the truth: {100 * agree / known:.1f}% of {known} events whose truth is known")
        if self.seq_gaps:
            out.append(f"{self.seq_gaps} gap(s) in seq: the log lost decisions (see the service's log)")
        return out


def summarise(columns: dict[str, np.ndarray], attrs: dict[str, Any]) -> RunSummary:
    labels = columns["label"].astype(str)
    seq = columns["seq"]
    counts = {label.text: int(np.sum(labels == label.text)) for label in Label}
    time_ns = columns["time_ns"]
    latency = columns["latency_us"]
    truth = columns["truth_n_particles"]
    known = (truth >= 0) & (labels != Label.ERROR.text)  # as the service counts it: an error is no answer
    agree = sum(label_of_count(int(t)).text == lab for t, lab in zip(truth[known], labels[known], strict=True))
    p50, p99 = (float(x) for x in np.percentile(latency, [50, 99]) / 1e3) if len(latency) else (np.nan, np.nan)
    return RunSummary(
        experiment=str(attrs.get("experiment", "")),
        run=int(attrs.get("run", -1)),
        events=len(labels),
        counts=counts,
        prefilter=int(np.sum(columns["reason"].astype(str) == PREFILTER)) if "reason" in columns else 0,
        keep=int(np.sum(columns["decision"].astype(str) == "keep")),
        seq_gaps=int(np.sum(np.diff(seq) != 1)) if len(seq) > 1 else 0,
        duration_s=float(time_ns[-1] - time_ns[0]) / 1e9 if len(time_ns) > 1 else 0.0,
        first_batch=int(np.sum(time_ns == time_ns[0])) if len(time_ns) else 0,
        latency_ms=(p50, p99) if len(latency) else None,
        truth_agree=(int(agree), int(known.sum())) if known.any() else None,
        complete=bool(attrs.get("complete", False)),
        ended=attrs.get("ended"),
        dropped=int(attrs.get("dropped", 0)),
    )


def write_csv(columns: dict[str, np.ndarray], out: Path) -> None:
    """One row per event with what `bank pick --picks` reads (run, event, label): correct the labels, keep the
    rows you are sure of."""
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(zip(*(np.asarray(columns[c]).tolist() for c in CSV_COLUMNS), strict=True))


def plot_run(columns: dict[str, np.ndarray], title: str, out: Path) -> None:
    """The label fractions over the run's events (rolling) and the scores of the labels, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = columns["label"].astype(str)
    events = columns["event"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
    window = min(ROLLING, max(len(labels), 1))
    kernel = np.ones(window) / window
    for label in Label if len(labels) else ():  # a log just begun holds no decision yet
        share = np.convolve(labels == label.text, kernel, mode="valid")
        if share.any():
            top.plot(events[window - 1 :], share, label=label.text)
    top.set(xlabel="event", ylabel=f"fraction of the last {window} events", ylim=(0, 1.02), title=title)
    if top.lines:  # none for a log just begun
        top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    score = columns["score"]
    for label in (Label.BLANK, Label.SINGLE, Label.MULTI):
        chosen = score[(labels == label.text) & np.isfinite(score)]
        if len(chosen):
            bottom.hist(chosen, bins=50, range=(-1, 1), alpha=0.6, label=f"{label.text} ({len(chosen)})")
    # the bank labels single exactly what it keeps: the singles' lowest score is at the threshold (not in the log)
    bottom.set(xlabel="single-hit score (the singles are the kept: at or above the bank's threshold)", ylabel="events")
    if bottom.patches:
        bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
