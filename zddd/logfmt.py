"""Log values for one-line key=value (logfmt) records that read well in the journal."""

import json


def quote(value: object) -> str:
    """`value` as one key=value token: bare when it is a plain word, JSON-quoted otherwise."""
    text = str(value)
    if text and all(c.isprintable() and not c.isspace() and c not in '"=\\' for c in text):
        return text
    return json.dumps(text)
