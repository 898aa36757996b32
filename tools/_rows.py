"""Shared by the sweep tools: rows written to a JSON file as they are measured."""
from __future__ import annotations

import json
import os


def row_writer(doc: dict, path: str):
    """``put(row)``: append ``row`` to ``doc["rows"]``, print it, and rewrite ``path`` atomically,
    so a cut-off run keeps every row it measured."""
    def put(row: dict) -> None:
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    return put
