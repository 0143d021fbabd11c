"""The decision log of a progressive method's fine-tune callback (EntPruner, gradient flow).

``<run_dir>/<LOG_NAME>`` holds one JSON record per line: a ``start`` record (schedule, budget,
settings), then one per decision. The callback's state is JSON data whose ``history`` holds the
same records and is saved with the fine-tune checkpoint, so a (re)start rewrites the log from the
state: a resumed run drops the records of what it redoes.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.io import atomic_write_text


class LoggedSchedule:
    """Base of a progressive TrainCallback: its JSON ``state`` (with a ``history`` list) and the log."""

    LOG_NAME = ""  # the log's file name in the run directory
    run_dir: Path | None = None
    state: dict

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))  # a copy: the checkpoint never aliases the live state

    def load_state_dict(self, state: dict) -> None:
        self.state = json.loads(json.dumps(state))

    def start_log(self, run_dir, head: dict) -> None:
        """(Re)write the log: the start record, then the state's history. No run_dir: no log."""
        self.run_dir = Path(run_dir) if run_dir else None
        if self.run_dir is not None:
            lines = [head] + self.state["history"]
            atomic_write_text(self.run_dir / self.LOG_NAME, "".join(json.dumps(r) + "\n" for r in lines))

    def record(self, rec: dict) -> None:
        """Add a record to the state's history and to the log."""
        self.state["history"].append(rec)
        if self.run_dir is not None:
            with open(self.run_dir / self.LOG_NAME, "a") as f:
                f.write(json.dumps(rec) + "\n")
