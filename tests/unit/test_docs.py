"""The documentation in step with the code: what the code exports, accepts and returns is in the
one reference that documents it (the man pages in packaging/man/, the shipped config), and the
README and docs/ link only to what exists. zddctl's commands and options: test_zddctl_docs.py."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zddd import cli, config, daemon
from zddd.service import metrics

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "packaging" / "man"
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def roff(name: str) -> str:
    """A man page's source with hyphens unescaped and font changes dropped."""
    text = (MAN / name).read_text().replace("\\-", "-")
    return re.sub(r"\\f[BIRP]", "", text)


def section(text: str, title: str) -> str:
    """The body of `.SH title`, up to the next .SH."""
    match = re.search(rf"^\.SH \"?{re.escape(title)}\"?\n(.*?)(?=^\.SH |\Z)", text, re.S | re.M)
    assert match, f"no section {title}"
    return match.group(1)


# ---- metrics: zddd(8) METRICS lists exactly what the exporter exports ----------------------

def exported_metrics() -> set[str]:
    """Sample names as Prometheus shows them, from the families metrics.py builds."""
    source = Path(metrics.__file__).read_text()
    names = set()
    suffix = {"Counter": "_total", "Info": "_info"}
    for kind, name in re.findall(r"\b(Gauge|Counter|Info)MetricFamily\(\s*\"(zddd_\w+)\"", source):
        names.add(name + suffix.get(kind, ""))
    for kind, name in re.findall(r"\b(Counter|Histogram|Gauge)\(\s*\"(zddd_\w+)\"", source):
        names.add(name + suffix.get(kind, ""))
    return names


def test_the_metrics_are_found_in_the_source():
    # The parsing above must see every kind of metric, or the tests below check nothing.
    names = exported_metrics()
    assert {"zddd_switches_total", "zddd_switch_duration_seconds", "zddd_active_target",
            "zddd_build_info", "zddd_flow_entries", "zddd_flow_capacity"} <= names, names


@pytest.mark.parametrize("name", sorted(exported_metrics()))
def test_every_exported_metric_is_in_zddd_8(name):
    assert re.search(rf"(?<!\w){name}(?!\w)", section(roff("zddd.8"), "METRICS")), name


def test_zddd_8_lists_no_metric_the_code_does_not_export():
    listed = set(re.findall(r"zddd_\w+", section(roff("zddd.8"), "METRICS")))
    assert listed <= exported_metrics(), listed - exported_metrics()


def test_zddd_8_gives_the_switch_results_and_the_invalid_target():
    text = section(roff("zddd.8"), "METRICS")
    for value in (*metrics.RESULTS, "invalid"):
        assert re.search(rf"(?<!\w){value}(?!\w)", text), value


# ---- config keys: every key zddd accepts is in zddd.toml(5) and the shipped config ----------

def nested_keys() -> set[str]:
    """Keys of the config's tables: the set literals that config.py hands to _unknown()."""
    tree = ast.parse(Path(config.__file__).read_text())
    keys = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "_unknown"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Set)):
            keys |= {e.value for e in node.args[1].elts if isinstance(e, ast.Constant)}
    return keys


TABLES = {"targets", "health", "agent", "metrics", "services"}


def test_the_keys_are_found_in_the_source():
    assert TABLES <= config._SCHEMA_TOP
    assert {"port", "health", "interval", "timeout", "listen"} <= nested_keys()


@pytest.mark.parametrize("key", sorted(config._SCHEMA_TOP | nested_keys()))
def test_every_config_key_is_in_zddd_toml_5(key):
    text = roff("zddd.toml.5")
    if key in TABLES:
        assert re.search(rf"^\.SH .*\[{key}[].]", text, re.M), key
    else:
        assert re.search(rf"^\.BR? {key}(\s|$)", text, re.M), key


@pytest.mark.parametrize("key", sorted(config._SCHEMA_TOP | nested_keys()))
def test_every_config_key_is_in_the_shipped_config(key):
    text = (REPO / "packaging" / "zddd.toml").read_text()
    if key in TABLES:
        assert re.search(rf"^#\[{key}[].]", text, re.M), key
    else:
        assert re.search(rf"^#{key} = ", text, re.M), key


def test_interfaces_says_which_links_are_taken():
    # Only Ethernet-framed links and lo are taken by default (zddd/backends/rewrite.py).
    for text in (roff("zddd.toml.5"), (REPO / "packaging/zddd.toml").read_text(),
                 (REPO / "examples/zddd.toml").read_text()):
        assert "Ethernet" in text


def test_every_backend_is_named_where_the_bpf_needs_are():
    bpf = [b for b in config.BACKENDS if b != "nftables"]
    for name, text in (("zddd.8", roff("zddd.8")), ("zddd.toml.5", roff("zddd.toml.5")),
                       ("packaging/zddd.toml", (REPO / "packaging/zddd.toml").read_text())):
        assert "zddd-bpf.conf" in text and "zddd-sk-lookup.conf" in text, name
        assert all(b in text for b in bpf), name
    files = section(roff("zddd.8"), "FILES")
    assert all(b in files for b in bpf), files


# ---- exit status and options --------------------------------------------------------------

def test_zddd_8_gives_every_exit_status_of_zddd():
    codes = {0} | {v for k, v in vars(daemon).items() if k.startswith("EXIT_")}
    listed = set(map(int, re.findall(r"^\.B (\d+)$", section(roff("zddd.8"), "EXIT STATUS"),
                                     re.M)))
    assert codes == listed, (codes, listed)


def test_zddctl_1_gives_every_exit_status_of_zddctl():
    source = Path(cli.__file__).read_text()
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    codes |= {int(n) for n in re.findall(r"^\s+return (\d+)$", source, re.M)}
    assert 130 in codes  # Ctrl-C
    listed = set(map(int, re.findall(r"^\.B (\d+)$", section(roff("zddctl.1"), "EXIT STATUS"),
                                     re.M)))
    assert codes == listed, (codes, listed)


def test_every_zddd_option_is_in_zddd_8():
    out = subprocess.run([sys.executable, "-m", "zddd.daemon", "--help"], capture_output=True,
                         text=True, check=True).stdout
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", out)) - {"--help"}
    assert "--remove-data-plane" in options
    text = roff("zddd.8")
    assert not {o for o in options if o not in text}, options


def test_the_ss_line_covers_sk_lookup():
    # sk_lookup does not rewrite the port: its connections stay on the listen port.
    text = section(roff("zddctl.1"), "TROUBLESHOOTING")
    assert "sk_lookup" in text and "sport = :8888" in text
    readme = (REPO / "README.md").read_text()
    assert "sk_lookup" in readme and "sport = :8888" in readme


# ---- paths the man pages name are the package's ----------------------------------------------

def installed_paths() -> set[str]:
    """Where the binary packages' .install files put things (dh_install: sources, then the
    destination directory)."""
    out = set()
    for install in (REPO / "packaging" / "debian").glob("*.install"):
        for line in install.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            *sources, dest = words
            dest = "/" + dest.strip("/")
            out.add(dest)
            out |= {f"{dest}/{Path(src).name}" for src in sources if "*" not in src}
    return out


@pytest.mark.parametrize("page", ["zddd.8", "zddctl.1", "zddd.toml.5"])
def test_shipped_paths_in_the_man_pages_are_installed(page):
    # /usr/share/doc is the package's documentation (dh_installdocs, dh_installexamples).
    named = re.findall(r"(/(?:usr/share/zddd|usr/libexec/zddd|usr/share/dbus-1)[\w./@-]*)",
                       roff(page))
    shipped = installed_paths()
    for path in named:
        path = path.rstrip(".,;)")
        assert any(path == s or path.startswith(s + "/") or s.startswith(path.rstrip("/"))
                   for s in shipped), path


# ---- the README and docs/ ---------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_lead_somewhere(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), (page.name, target)
        if anchor:
            assert anchor in anchors(dest), (page.name, target, sorted(anchors(dest)))


def test_the_readme_gives_make_demo_and_make_test_first_and_says_what_they_install():
    readme = (REPO / "README.md").read_text()
    intro = readme.split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", intro, re.S).group(1)
    assert re.search(r"^make demo\b", block, re.M) and re.search(r"^make test\b", block, re.M)
    before = intro[:intro.index("```sh")]
    for package in ("HAProxy", "nginx", "openssh-server", "Ansible", "LLVM"):
        assert package in before, package


def test_the_readme_says_once_that_haproxy_keeps_the_last_agent_answer():
    readme = (REPO / "README.md").read_text()
    assert len(re.findall(r"HAProxy keeps the last", readme)) == 1


def test_the_readme_has_a_canary_section_an_operator_can_follow():
    # Issue #17: weights and ramps by hand, and the Ansible role's canary with its variables.
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Canary deploys\n", 1)[1].split("\n## ", 1)[0]
    for word in ("zddctl weights", "--ramp", "ready up N%", "zddd_canary_steps",
                 "zddd_canary_step_seconds", "zddd_canary_abort_query",
                 "zddd_canary_prometheus_url", "zddd_target_weight",
                 "haproxy_server_http_responses_total"):
        assert word in section, word
    assert "later release" not in readme
