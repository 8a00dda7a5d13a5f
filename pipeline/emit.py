"""What a reporting command prints: one JSON object on stdout (--json), or its text form."""

from __future__ import annotations

import json
import sys


def emit(result: dict, as_json: bool, text) -> int:
    """`text(result)` is the command's text form of the result; returns exit status 0."""
    if as_json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text(result))
    return 0
