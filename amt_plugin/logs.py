"""Reading fairseq's logs back: the one parser run.sh, GLUE, the benchmarks, the plots and the
tests use.

fairseq writes one line of statistics per event, tagged with its kind: `train_inner` per
logging window, `train` per epoch, and per validation subset its name (`valid`, `test`,
`valid1`, ...). A line comes in one of two formats (`--log-format simple` or `json`) behind
one of two prefixes (fairseq-train's `... | INFO | KIND | ...`, fairseq-hydra-train's
`[KIND][INFO] - ...`). `records(text, kind)` returns each line of that kind as a dict, in
order, numbers as floats; json's `KIND_` prefix on validation and epoch keys is dropped, so
both formats give the same keys (`loss`, `num_updates`, `fixed_mask_loss`, ...).

TensorBoard event files are read with tensorboard's own EventAccumulator (`scalars`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

_LINE = re.compile(r"(?:\| [A-Z]+ \| (?P<plain>[\w.-]+) \| |\[(?P<hydra>[\w.-]+)\]\[[A-Z]+\] - )"
                   r"(?P<body>.*)$")
_KEY_EQ = re.compile(r"(\w+)=([^,\s]+)")  # simple train_inner: "... loss=8.1, wps=2e+04, ..."
_KEY_BAR = re.compile(r"(?:^|\| )(\w+) ([^|]*?)\s*(?=\||$)")  # simple: "| loss 8.1 | ..."


def _value(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v.strip()
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def records(text: str, kind: str) -> list[dict]:
    """Every logged line of one kind in `text` (a log's contents), as {key: value}."""
    found = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if m is None or (m["plain"] or m["hydra"]) != kind:
            continue
        body = m["body"].strip()
        if body.startswith("{"):
            prefix = f"{kind}_"
            entry = {k.removeprefix(prefix): v for k, v in json.loads(body).items()}
        elif "=" in body:
            entry = dict(_KEY_EQ.findall(body))
        else:
            entry = dict(_KEY_BAR.findall(body))
        found.append({k: _value(v) for k, v in entry.items()})
    return found


def read(path: Path, kind: str) -> list[dict]:
    return records(Path(path).read_text(errors="replace"), kind)


def series(entries: list[dict], key: str, step: str = "num_updates") -> list[tuple[int, float]]:
    """(step, value) pairs of one key, where both were logged."""
    return [(int(e[step]), float(e[key])) for e in entries
            if isinstance(e.get(key), float) and isinstance(e.get(step), float)]


def scalars(path: Path, tags: tuple[str, ...] | None = None) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of one event file, or of the newest event file under a directory:
    {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # it narrates every read
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("**/events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
        if not files:
            raise FileNotFoundError(f"no TensorBoard event file under {path}")
        path = files[-1]
    events = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
    wanted = events.Tags()["scalars"] if tags is None else tags
    return {t: [(e.step, e.value) for e in events.Scalars(t)] if t in events.Tags()["scalars"]
            else [] for t in wanted}
