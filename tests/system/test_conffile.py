"""The shipped /etc/zddd/zddd.toml: as shipped it means the built-in defaults, and every key of
the config is in it, commented out with its default value."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from zddd.config import _SCHEMA_TOP, Config, from_dict

CONFFILE = Path(__file__).resolve().parents[2] / "packaging" / "zddd.toml"


SERVICES_MARK = "# ---- Several services"


def _uncommented(text: str) -> str:
    """The file with every commented-out setting ("#key = ..." or "#[table]") made live; prose
    comments ("# ...") and the example-only interfaces line stay comments. The many-service
    example at the end is the other form of the same keys: left out (see the test of it)."""
    lines = []
    for line in text.split(SERVICES_MARK)[0].splitlines():
        if re.match(r"#(\[|[a-z_]+ = )", line) and not line.startswith("#interfaces"):
            line = line[1:]
        lines.append(line)
    return "\n".join(lines)


def test_as_shipped_it_is_the_defaults():
    assert from_dict(tomllib.loads(CONFFILE.read_text())) == Config()


def test_every_key_is_there_commented_out_with_its_default():
    live = tomllib.loads(_uncommented(CONFFILE.read_text()))
    assert from_dict(live) == Config()
    assert set(live) | {"interfaces", "services"} == _SCHEMA_TOP
    assert "#interfaces = " in CONFFILE.read_text()
    assert set(live["targets"]) == {"main", "backup"}
    for target in live["targets"].values():
        assert set(target) == {"port", "health"}
    assert set(live["health"]) == {"interval", "timeout", "rise", "fall", "host", "address"}
    assert set(live["agent"]) == {"listen", "weights"} and set(live["metrics"]) == {"listen"}


def test_the_many_service_example_is_a_valid_config_of_two_services():
    text = CONFFILE.read_text()
    head, example = text.split(SERVICES_MARK)
    lines = [line[1:] if re.match(r"#(\[|[a-z_]+ = )", line) else line
             for line in example.splitlines()[1:]]  # (the rest of the mark's line first)
    config = from_dict(tomllib.loads("\n".join(lines)))
    assert len(config.services) == 2 and not config.single
