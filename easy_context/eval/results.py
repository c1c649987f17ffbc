"""A sweep's results on disk, resumable: a JSON file of its settings and records, rewritten atomically after every
record, that refuses to mix in results of other settings; and the CSV written beside it."""

from __future__ import annotations

import csv
import json
import os
from typing import Any


def settings_diff(old: dict, new: dict) -> str:
    """"key: old there, new now" for every key whose value differs between two settings dicts."""
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON atomically (temporary file, then os.replace), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def write_csv(path: str, rows: list[dict], columns: list[str], *, header: str | None = None) -> str:
    """Write ``rows`` as CSV with ``columns`` (missing values empty, other keys left out) under an optional
    ``# header`` comment line; atomic, creating the folder; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        if header is not None:
            f.write(f"# {header}\n")
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


class ResultsFile:
    """The JSON file at ``path``: a sweep's ``settings`` and its ``records`` (stored under ``key``). Reopening it
    with the same settings resumes (``records``, and the whole file as read in ``saved``); other settings raise a
    ValueError naming what differs and ``remedy``, instead of mixing two experiments."""

    def __init__(self, path: str, settings: dict, *, key: str, remedy: str):
        self.path, self.key = path, key
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.saved: dict = {}
        if os.path.exists(path):
            with open(path) as f:
                self.saved = json.load(f)
            old = self.saved.get("settings", {})
            if old != self.settings:
                diff = settings_diff(old, self.settings)
                raise ValueError(f"{path} holds results of different settings ({diff}); {remedy}")
        self.records: list[dict] = self.saved.get(key, [])

    def save(self, **fields: Any) -> None:
        """Rewrite the file atomically: the settings, ``fields`` (e.g. a header), then every record."""
        write_json(self.path, {"settings": self.settings, **fields, self.key: self.records})
