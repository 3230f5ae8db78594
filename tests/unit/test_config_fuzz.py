"""config.py under property-based fuzzing (hypothesis): every key of a valid config set to any
value TOML can hold, and arbitrary files, give a Config or a ConfigError naming the key at fault,
never another exception. Bounded (max_examples, deadline) so the unit layer stays fast."""

from __future__ import annotations

import datetime as dt
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zddd.config import ConfigError, from_dict, load

FUZZ = settings(max_examples=200, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

# A config that sets every key, each to a valid value; the fuzzer spoils one key at a time.
VALID = {
    "listen_port": 8888, "backend": "nftables", "interfaces": ["lo", "eth0"],
    "xdp_mode": "native", "bpf_pin_dir": "/sys/fs/bpf/zddd", "bpf_flow_entries": 4096,
    "initial": "main", "state_file": "/var/lib/zddd/state.json", "drain_timeout": 30,
    "targets": {"main": {"port": 8080, "health": "tcp", "health_rise": 2, "health_fall": 2,
                         "health_host": "main.example", "health_address": "::1"},
                "backup": {"port": 80, "health": "http:/health"}},
    "health": {"interval": 1.0, "timeout": 0.5, "rise": 1, "fall": 3, "host": "app.example",
               "address": "127.0.0.1"},
    "agent": {"listen": "[::]:8889"}, "metrics": {"listen": "127.0.0.1:9488"},
}
PATHS = [
    ("listen_port",), ("backend",), ("interfaces",), ("xdp_mode",), ("bpf_pin_dir",),
    ("bpf_flow_entries",), ("initial",), ("state_file",), ("drain_timeout",), ("targets",),
    ("targets", "main"), ("targets", "main", "port"), ("targets", "main", "health"),
    ("targets", "backup", "port"), ("targets", "backup", "health"), ("health",),
    ("health", "interval"), ("health", "timeout"), ("health", "rise"), ("health", "fall"),
    ("health", "host"), ("health", "address"), ("targets", "main", "health_rise"),
    ("targets", "main", "health_fall"), ("targets", "main", "health_host"),
    ("targets", "main", "health_address"), ("agent",), ("agent", "listen"),
    ("metrics",), ("metrics", "listen"),
]
# Keys whose value is a port: a bad one may be reported on the key it collides with.
PORT_KEYS = {"listen_port", "targets.main.port", "targets.backup.port", "agent.listen",
             "metrics.listen"}

# Everything tomllib can hand back: the scalars (with integers past 64 bits, which it accepts,
# and floats inf/nan), dates and times, arrays and tables, nested.
ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "main ", "Main", "off", "tc", "xdp", "sk_lookup", "generic",
                     "http:", "http:/", "http:/a b", "http:/é", "http:/\x00", "tcp\n",
                     "[::]:", ":8889", "[::1]:0", "[::1]:65536", "1.2.3.4:²", "1.2.3.4:٨٨",
                     "[1.2.3.4]:80", "::1:80", "fe80::1%lo:80", "localhost:9488", "/a\x00b",
                     "relative/path", "/", "x" * 70000, "é" * 20, "\u202e", "lo\x00"]),
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**63 - 1, -(2**63), 2**64 - 1, 10**400, 86400,
                     86401]),
    st.floats(allow_nan=True, allow_infinity=True),
    ODD_TEXT,
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.dates(), st.times(),
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=8,
)


def _spoiled(path: tuple[str, ...], value) -> dict:
    import copy

    data = copy.deepcopy(VALID)
    table = data
    for part in path[:-1]:
        table = table[part]
    table[path[-1]] = value
    return data


def _names_the_key(error: ConfigError, path: tuple[str, ...]) -> bool:
    dotted = ".".join(path)
    key = error.key
    if key == dotted or key.startswith(dotted + ".") or key.startswith(dotted + "["):
        return True
    # A port (or a table holding one) that clashes is reported on the second key of the pair.
    return key in PORT_KEYS and any(k.startswith(dotted) for k in PORT_KEYS)


@FUZZ
@given(path=st.sampled_from(PATHS), value=TOML_VALUES)
def test_any_value_for_any_key_is_taken_or_refused_naming_the_key(path, value):
    try:
        from_dict(_spoiled(path, value))
    except ConfigError as e:
        assert _names_the_key(e, path), (path, e.key, str(e)[:200])
        assert str(e).startswith(e.key), str(e)[:200]


@FUZZ
@given(name=ODD_TEXT.filter(lambda n: n not in VALID), value=TOML_VALUES,
       where=st.sampled_from(["", "targets.main", "health", "agent", "metrics"]))
def test_unknown_keys_anywhere_are_refused_naming_them(name, value, where):
    data = _spoiled(("x",), None)
    del data["x"]
    table, prefix = data, ""
    for part in filter(None, where.split(".")):
        table = table[part]
        prefix += part + "."
    if name in table:
        return
    table[name] = value
    try:
        from_dict(data)
    except ConfigError as e:
        assert e.key == prefix + name, (e.key, prefix + name)
    else:
        raise AssertionError(f"unknown key {prefix + name!r} was accepted")


@FUZZ
@given(path=st.sampled_from(PATHS), value=TOML_VALUES)
def test_what_is_accepted_is_well_formed(path, value):
    """A config that passes holds only values zddd can use: in-range ports, finite durations
    within a day, paths without control characters."""
    try:
        config = from_dict(_spoiled(path, value))
    except ConfigError:
        return
    ports = [config.listen_port] + [t.port for t in config.targets.values()]
    assert all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports)
    assert len(set(ports)) == len(ports)
    for seconds in (config.drain_timeout, config.health_interval, config.health_timeout):
        assert isinstance(seconds, float) and 0 <= seconds <= 86400
    assert int(config.drain_timeout * 1e6) < 2**64
    for p in (config.state_file, config.bpf_pin_dir):
        assert p.startswith("/") and p.isprintable()
    for name in config.interfaces or ():
        assert 0 < len(name.encode()) <= 15 and name.isprintable()
    for t in config.targets.values():
        assert t.health.path.isascii() and t.health.path.isprintable()


TOML_CHARS = string.printable + "[]{}=\"'#.,éあ\x00\x7f"


@settings(max_examples=200, deadline=1000)
@given(text=st.text(alphabet=TOML_CHARS, max_size=200) | st.binary(max_size=200))
def test_any_file_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "zddd.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    try:
        load(path)
    except ConfigError:
        pass


def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path):
    for text in ("x = " + "[" * 100000, "x = " + "{a=" * 100000):
        path = tmp_path / "deep.toml"
        path.write_text(text)
        try:
            load(path)
        except ConfigError as e:
            assert e.key == "" and "TOML" in str(e)
        else:
            raise AssertionError("accepted")


def test_the_fixed_edge_cases_name_their_key():
    cases = {
        "drain_timeout": {"drain_timeout": 10**400},
        "health.interval": {"health": {"interval": 1e300}},
        "metrics.listen": {"metrics": {"listen": "1.2.3.4:²"}},
        "state_file": {"state_file": "/a\x00b"},
        "interfaces[0]": {"interfaces": ["éééééééé"]},
        "targets.main.health": {"targets": {"main": {"health": "http:/é"}}},
    }
    for key, data in cases.items():
        try:
            from_dict(data)
        except ConfigError as e:
            assert e.key == key, (key, e.key)
        else:
            raise AssertionError(f"{key}: accepted {data}")
