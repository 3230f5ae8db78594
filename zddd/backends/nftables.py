"""The nftables backend: one table, `inet zddd`, changed only in atomic libnftables JSON batches.

Layout v2 (what `nft list table inet zddd` shows), every service of the data plane in one
table, keyed by listen port; here "default" (8888 -> 8080/80) steering to main, and "api"
(9888 -> 9080/90) splitting 30 % to main:

    table inet zddd {
        counter layout_v2 { }                  # the layout version this zddd writes
        map steer {                            # the switch: one element per service
            type inet_service : verdict
            elements = { 8888 : goto steer_main, 9888 : goto split_30 } }
        map main_port {                        # each service's target ports, and per service
            type inet_service : inet_service   # and target the new connections steered
            counter
            elements = { 8888 counter packets 3 bytes 180 comment "default" : 8080,
                         9888 counter packets 1 bytes 60 comment "api" : 9080 } }
        map backup_port { ... 8888 ... : 80, 9888 ... : 90 }
        chain steer_main { meta l4proto tcp fib daddr type local
                           redirect to :tcp dport map @main_port }
        chain steer_backup { ... redirect to :tcp dport map @backup_port }
        chain split_30 { numgen random mod 100 < 30 goto steer_main
                         goto steer_backup }
        chain prerouting { type nat hook prerouting priority dstnat; policy accept;
                           tcp dport vmap @steer }
        chain output { type nat hook output priority dstnat; policy accept;
                       tcp dport vmap @steer }
    }

A service's weight is its one element of `steer`: `goto steer_main` (100), `goto steer_backup`
(0), `goto split_<N>` (N, 1..99), no element (off: the rule no longer matches and nothing
listens on the listen port, so new connections are refused). A switch deletes and adds that
one element in one transaction, and nothing of any other service. The chains are shared by
every service: the listen port, still the packet's destination port there, picks the service's
target port in `main_port` / `backup_port`, whose per-element counters count the connections
steered (the element's comment names the service). A service is elements alone, so the table
has the same objects with 1 or 64 services, and libnftables, which loads every chain and
counter of a table before it changes an element, commits a switch in the same time. A split
chain is made the first time a weight needs it and kept while unused, up to SPARE_SPLITS of
them (a ramp's trail of more goes with the change that leaves one more unused). NAT chains
see only the first packet of a connection: the split is drawn once, and the conntrack entry
keeps the connection on its target through any later switch. Layout v1 (one service, the same
`steer` map and chains) is upgraded in place: its element stays, only rules and the per-target
counters change.

The NAT chains stay registered in `off`, and an upgrade or a repair rewrites their rules rather
than delete them where it can: conntrack keeps translating connections that were redirected
before, and that needs the NAT hooks. `fib daddr type local` keeps zddd from hijacking traffic
routed through this host to another machine's port. Nothing outside the table is ever written.

`read` lists the table once and `plan` works from that listing alone: a minimal diff, so adding
a service adds its elements, removing one removes them, a repair rewrites what differs, and a
switch is its element alone.

The `layout_vN` object marks which layout a table has (nft 1.0.6 keeps no table comment in
JSON). An older layout is rewritten in one transaction (no flip); a newer one, written by a
newer zddd, is never mistaken for damage: zddd refuses to touch it.

A table with flags (made dormant by hand, or owned by another process) is never listed as JSON:
libnftables 1.0.6, Debian 12's, frees the JSON array of a table's only flag before printing it.
The listing then ends in garbage, and the heap is corrupted. zddd aborted with "corrupted
double-linked list". Fixed upstream after 1.0.6. zddd reads the table's flags over netlink first
(zddd.kernel.nfnetlink).
A table with flags is listed object by object (chains, maps, sets, counters), which never prints
the table itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..kernel import netlink, nfnetlink
from . import (BACKUP, MAIN, ApplyError, Backend, BackendUnavailable, Desired, KernelState,
               NewerLayout, Plan, weight_target)

FAMILY = "inet"
TABLE = "zddd"
STEER = "steer"  # listen port -> where the service's new connections go: the switch
TARGETS = (MAIN, BACKUP)
PORT_MAP = {MAIN: "main_port", BACKUP: "backup_port"}  # listen port -> the target's port
NAT_PRIORITY = -100  # dstnat
LAYOUT_VERSION = 2
_LAYOUT_PREFIX = "layout_v"
_SPLIT_PREFIX = "split_"
SPARE_SPLITS = 4  # split chains kept while no service uses them
_REF = {"family": FAMILY, "table": TABLE}


def target_chain(target: str) -> str:
    return f"steer_{target}"


def split_chain(weight: int) -> str:
    return f"{_SPLIT_PREFIX}{weight}"


def _split_weight(chain: str) -> int | None:
    digits = chain[len(_SPLIT_PREFIX):]
    if chain.startswith(_SPLIT_PREFIX) and digits.isdigit() and split_chain(int(digits)) == chain:
        weight = int(digits)
        return weight if 0 < weight < 100 else None
    return None


def _tcp_dport() -> dict:
    return {"payload": {"protocol": "tcp", "field": "dport"}}


def _hook_rule() -> list:
    # One hash lookup for every new TCP connection; the rest happens only for listen ports.
    return [{"vmap": {"key": _tcp_dport(), "data": "@" + STEER}}]


def _target_rule(target: str) -> list:
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                   "right": "local"}},
        {"redirect": {"port": {"map": {"key": _tcp_dport(), "data": "@" + PORT_MAP[target]}}}},
    ]


def _split_rules(weight: int) -> list:
    draw = {"numgen": {"mode": "random", "mod": 100, "offset": 0}}
    return [
        [{"match": {"op": "<", "left": draw, "right": weight}},
         {"goto": {"target": target_chain(MAIN)}}],
        [{"goto": {"target": target_chain(BACKUP)}}],
    ]


def _goto(chain: str) -> dict:
    return {"goto": {"target": chain}}


def steer_verdict(weight: int | None) -> dict | None:
    """The `steer` element's verdict for a main weight (None: off, no element)."""
    target = weight_target(weight)
    if weight is None or target is None:
        return None
    return _goto(split_chain(weight) if target == "split" else target_chain(target))


def _weight_of(element: dict) -> tuple[bool, int | None]:
    """(whether a `steer` element is one zddd writes, the main weight it stands for)."""
    verdict = element.get("data")
    if not isinstance(verdict, dict) or set(element) != {"data"} or len(verdict) != 1:
        return False, None
    chain = verdict.get("goto", {}).get("target")
    if not isinstance(chain, str):
        return False, None
    for target, weight in ((MAIN, 100), (BACKUP, 0)):
        if chain == target_chain(target):
            return True, weight
    split = _split_weight(chain)
    return (split is not None), split


def _named(name: str) -> dict:
    return {"family": FAMILY, "table": TABLE, "name": name}


def _layout(desired: Desired, spare_splits: tuple[int, ...] = ()) -> dict[tuple[str, str], dict]:
    """Every object of the table as nft lists it (minus handles, counts and elements), by
    (kind, name), in the order a build creates them; chains carry their rules' expressions
    under "rules". Split chains: those `desired` uses, and `spare_splits` (found, kept)."""
    objects: dict[tuple[str, str], dict] = {}
    marker = f"{_LAYOUT_PREFIX}{LAYOUT_VERSION}"
    objects[("counter", marker)] = _named(marker)
    objects[("map", STEER)] = {**_named(STEER), "type": "inet_service", "map": "verdict"}
    for target in TARGETS:
        objects[("map", PORT_MAP[target])] = {
            **_named(PORT_MAP[target]), "type": "inet_service", "map": "inet_service",
            "stmt": [{"counter": None}]}
    for target in TARGETS:
        objects[("chain", target_chain(target))] = {**_named(target_chain(target)),
                                                    "rules": [_target_rule(target)]}
    splits = {s.weight for s in desired.services
              if s.weight is not None and weight_target(s.weight) == "split"}
    for weight in sorted(splits | set(spare_splits)):
        objects[("chain", split_chain(weight))] = {**_named(split_chain(weight)),
                                                   "rules": _split_rules(weight)}
    for hook in ("prerouting", "output"):
        objects[("chain", hook)] = {
            **_named(hook), "type": "nat", "hook": hook, "prio": NAT_PRIORITY,
            "policy": "accept", "rules": [_hook_rule()]}
    return objects


def _elements(desired: Desired) -> dict[str, dict]:
    """Every map's elements as zddd writes them: map -> {listen port: element}, an element
    being {"data": its value} plus the "comment" it carries."""
    elements = {name: {s.listen_port: {"data": s.port_of(target), "comment": s.name}
                       for s in desired.services if target in dict(s.ports)}
                for target, name in PORT_MAP.items()}
    elements[STEER] = {s.listen_port: {"data": steer_verdict(s.weight)}
                       for s in desired.services if s.weight is not None}
    return elements


_VOLATILE = ("handle", "packets", "bytes", "elem", "table")


def _comparable(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in _VOLATILE and k != "rules"}


# nft names a protocol number only where /etc/protocols does (Debian's netbase; a minimal
# system may lack it): the same rule lists as `meta l4proto tcp` or `meta l4proto 6`.
_PROTOCOL_NUMBERS = {"tcp": 6}


def _same_rules(found: list, wanted: list) -> bool:
    def normal(value):
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [normal(v) for v in value]
        return _PROTOCOL_NUMBERS.get(value, value) if isinstance(value, str) else value

    return normal(found) == normal(wanted)


def _strings_in(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_strings_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_strings_in(v) for v in value)) if value else set()
    return {value} if isinstance(value, str) else set()


def _element(item) -> tuple:
    """(key, element) of an element as nft lists it: the element is {"data": value} plus what
    the key carries (its comment, a timeout...) but its counter, which counts."""
    key, data = (item if isinstance(item, list) and len(item) == 2 else (item, None))
    element = {"data": data}
    if isinstance(key, dict) and "elem" in key:
        element.update({k: v for k, v in key["elem"].items() if k not in ("val", "counter")})
        key = key["elem"].get("val")
    if not isinstance(key, int):
        key = json.dumps(key, sort_keys=True)
    return key, element


@dataclass
class Found:
    """What `read` listed of the table, all that `plan` needs: its flags, its objects by
    (kind, name) without handles and counts, each chain's rules, each map's elements."""

    flags: tuple[str, ...] = ()
    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    rules: dict[str, list] = field(default_factory=dict)
    elements: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def parse(cls, listing: list[dict]) -> "Found":
        found = cls()
        for item in listing:
            (kind, obj), = item.items()
            if kind == "metainfo":
                continue
            if kind == "table":
                found.flags = tuple(obj.get("flags") or ())
            elif kind == "rule":
                found.rules.setdefault(obj["chain"], []).append(obj["expr"])
            else:
                found.objects[(kind, obj["name"])] = _comparable(obj)
                if kind == "map":
                    found.elements[obj["name"]] = dict(_element(e) for e in obj.get("elem", []))
        return found

    def version(self) -> int | None:
        versions = [int(name[len(_LAYOUT_PREFIX):]) for kind, name in self.objects
                    if kind == "counter" and name.startswith(_LAYOUT_PREFIX)
                    and name[len(_LAYOUT_PREFIX):].isdigit()]
        return max(versions) if versions else None

    def spare_splits(self, desired: Desired) -> tuple[int, ...]:
        """The split chains there that `desired` does not use but that stay, by weight: all
        of them while there are at most SPARE_SPLITS, so a canary going back and forth
        stays a one-element switch; none once there are more (a ramp's trail), since
        libnftables loads every chain of the table before each switch."""
        used = {s.weight for s in desired.services}
        spare = tuple(w for kind, name in self.objects if kind == "chain"
                      for w in [_split_weight(name)] if w is not None and w not in used)
        return spare if len(spare) <= SPARE_SPLITS else ()


def _key_json(key):
    return json.loads(key) if isinstance(key, str) else key


@dataclass
class Diff:
    """`found` against `desired`: what differs (for the log), the layout commands that repair
    it, and the flip, the steering elements of the services whose weight changes."""

    problems: list[str] = field(default_factory=list)
    layout: list = field(default_factory=list)
    flip: list = field(default_factory=list)


def _element_cmd(verb: str, map_name: str, key, element: dict | None = None) -> dict:
    if element is None:
        elem = _key_json(key)
    else:
        extra = {k: v for k, v in element.items() if k != "data"}
        elem = [{"elem": {"val": key, **extra}} if extra else key, element["data"]]
    return {verb: {"element": {**_REF, "name": map_name, "elem": [elem]}}}


def diff(found: Found | None, desired: Desired) -> Diff:
    """The minimal change from `found` (None: no table) to `desired`, in one transaction's
    order: references go before what they point at, and come back after. The steer elements
    of the services whose weight changes are the flip; everything else is layout."""
    out = Diff()
    expected = _layout(desired, found.spare_splits(desired) if found else ())
    wanted = _elements(desired)
    if found is None:
        out.layout.append({"add": {"table": {"family": FAMILY, "name": TABLE}}})
        _create(out, expected, list(expected), [k[1] for k in expected if k[0] == "chain"])
        for name, elements in wanted.items():
            commands = [_element_cmd("add", name, k, e) for k, e in elements.items()]
            (out.flip if name == STEER else out.layout).extend(commands)
        return out
    if found.flags:
        out.problems.append(f"table flags {', '.join(found.flags)}")
        # No flags: a table someone made dormant wakes up again.
        out.layout.append({"add": {"table": {"family": FAMILY, "name": TABLE, "flags": []}}})
    deleted = []
    for key, obj in found.objects.items():
        if key not in expected:
            unused = key[0] == "chain" and _split_weight(key[1]) is not None
            out.problems.append(f"{key[0]} {key[1]} {'unused' if unused else 'foreign'}")
            deleted.append(key)
        elif obj != _comparable(expected[key]):
            out.problems.append(f"{key[0]} {key[1]} changed")
            deleted.append(key)
    for key in expected:
        if key not in found.objects:
            out.problems.append(f"{key[0]} {key[1]} missing")
    gone = {name for _, name in deleted}
    gone_refs = {f"@{name}" for kind, name in deleted if kind in ("map", "set")} | gone
    rewritten = []
    for (kind, name), obj in expected.items():
        if kind != "chain" or (kind, name) not in found.objects or (kind, name) in deleted:
            continue
        rules = found.rules.get(name, [])
        if not _same_rules(rules, obj["rules"]):
            out.problems.append(f"chain {name} changed")
            rewritten.append(name)
        elif _strings_in(rules) & gone_refs:
            rewritten.append(name)  # what its rules name is deleted and made again

    # Elements: those pointing at chains that go, and those zddd would not have written, are
    # unlinked first; the ones missing are added last. The steer elements of the services
    # whose weight changes are the flip.
    readd: dict[str, dict] = {}
    flip_deletes, flip_adds = [], []
    services = desired.by_listen_port()
    for name, elements in wanted.items():
        fresh = ("map", name) in deleted or ("map", name) not in found.objects
        have = {} if fresh else found.elements.get(name, {})
        readd[name] = {}
        for key, element in have.items():
            want = elements.get(key)
            stale = bool(_strings_in(element) & gone)
            if name == STEER and key in services and _weight_of(element)[0]:
                if stale:  # its chain is made again: the element with it
                    out.layout.append(_element_cmd("delete", name, key))
                    if want is not None:
                        readd[name][key] = want
                elif element != want:
                    flip_deletes.append(_element_cmd("delete", name, key))
                    if want is not None:
                        flip_adds.append(_element_cmd("add", name, key, want))
                continue
            if want is None or element != want:
                what = "changed" if want is not None and name != STEER else "foreign"
                out.problems.append(f"map {name} element {key} {what}")
            if want is None or element != want or stale:
                out.layout.append(_element_cmd("delete", name, key))
                if want is not None:
                    readd[name][key] = want
        for key, want in elements.items():
            if key not in have:
                if name != STEER:  # a service off has no steer element
                    out.problems.append(f"map {name} element {key} missing")
                readd[name][key] = want
    # References first: rules and map elements can point at objects about to go.
    for key in deleted:
        if key[0] == "chain":
            out.layout.append({"flush": {"chain": {**_REF, "name": key[1]}}})
    for name in rewritten:
        out.layout.append({"flush": {"chain": {**_REF, "name": name}}})
    for key in deleted:
        if key[0] in ("map", "set"):
            out.layout.append({"flush": {key[0]: {**_REF, "name": key[1]}}})
    for group in ("chain", "map", "set", None):
        for key in deleted:
            if key[0] == group or (group is None and key[0] not in ("chain", "map", "set")):
                out.layout.append({"delete": {key[0]: {**_REF, "name": key[1]}}})
    created = [key for key in expected if key not in found.objects or key in deleted]
    _create(out, expected, created,
            [name for kind, name in expected if kind == "chain"
             and ((kind, name) in created or name in rewritten)])
    for name, elements in readd.items():
        commands = [_element_cmd("add", name, k, e) for k, e in elements.items()]
        (flip_adds if name == STEER else out.layout).extend(commands)
    out.flip = flip_deletes + flip_adds
    return out


def _create(out: Diff, expected: dict, objects: list, chains_with_rules: list[str]) -> None:
    for key in objects:
        out.layout.append({"add": {key[0]: {k: v for k, v in expected[key].items()
                                             if k != "rules"}}})
    for name in chains_with_rules:
        for expr in expected[("chain", name)]["rules"]:
            out.layout.append({"add": {"rule": {**_REF, "chain": name, "expr": expr}}})


def weights(found: Found, desired: Desired) -> dict[str, int | None]:
    """Each desired service's main weight as the `steer` map has it (None: off), for the
    services the table holds (an element of their own in any map); a service whose steer
    element is not one zddd writes is left out (a problem of `diff`'s)."""
    steer = found.elements.get(STEER, {})
    result: dict[str, int | None] = {}
    for s in desired.services:
        holds = any(s.listen_port in found.elements.get(m, {}) for m in PORT_MAP.values())
        if s.listen_port in steer:
            known, weight = _weight_of(steer[s.listen_port])
            if known:
                result[s.name] = weight
        elif holds:
            result[s.name] = None
    return result


TABLE_FLAG_NAMES = ("dormant", "owner", "persist")  # NFT_TABLE_F_*, bit by bit


def _flag_names(flags: int) -> list[str]:
    return [TABLE_FLAG_NAMES[i] if i < len(TABLE_FLAG_NAMES) else f"0x{1 << i:x}"
            for i in range(32) if flags & (1 << i)]


def _first_error(err: str | None) -> str:
    """libnftables repeats the kernel's error for every command of a refused batch (with the
    command and a caret line): the first error line says it."""
    lines = [line for line in (err or "").splitlines() if line.startswith("Error:")]
    if not lines:
        return ((err or "").strip() or "nftables refused the batch").splitlines()[0]
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return lines[0] + more


class NftablesBackend(Backend):
    name = "nftables"

    def __init__(self) -> None:
        # Opened on first use and kept for the backend's life: two libnftables contexts, one
        # that lists and one that commits, and a netlink socket for the table's flags.
        # libnftables caches what it listed and frees it when the ruleset changes: a commit on
        # the listing context would pay for freeing a whole listing of the table (every
        # service's elements) before a switch; the committing context caches only the few
        # objects a change needs.
        self._contexts: dict[str, Any] = {}
        self._netlink: netlink.Socket | None = None

    def _nft(self, purpose: str = "list"):
        if purpose not in self._contexts:
            import nftables

            nft = nftables.Nftables()
            nft.set_json_output(True)
            nft.set_handle_output(False)
            self._contexts[purpose] = nft
        return self._contexts[purpose]

    def _json_cmd(self, commands: list, purpose: str = "list") -> tuple[int, dict | None, str]:
        try:
            return self._nft(purpose).json_cmd({"nftables": commands})
        except ValueError as e:
            # Should a table gain flags between the netlink read and the listing, nft 1.0.6
            # prints garbage (see the module's docstring), at times not even JSON.
            raise ApplyError(f"nft printed what is not JSON ({e}); is table {FAMILY} {TABLE} "
                             "owned by another process?") from None

    def _cmd(self, commands: list, purpose: str = "list") -> dict | None:
        rc, out, err = self._json_cmd(commands, purpose)
        if rc != 0:
            raise ApplyError(_first_error(err))
        return out

    def probe(self) -> None:
        try:
            import nftables  # noqa: F401
        except ImportError:
            raise BackendUnavailable(
                "the nftables backend needs libnftables' Python binding: "
                "apt-get install python3-nftables") from None
        try:
            # Not `list tables`: it would print other tables' flags (see the docstring).
            self._cmd([{"list": {"flowtables": {"family": FAMILY}}}])
            self._table_flags()
        except OSError as e:
            raise BackendUnavailable(f"nftables is not usable here: {e.strerror or e}") from None
        except ApplyError as e:
            raise BackendUnavailable(f"nftables is not usable here: {e}") from None

    def _table_flags(self) -> int | None:
        if self._netlink is None:
            self._netlink = nfnetlink.open_socket()
        return nfnetlink.table_flags(self._netlink, TABLE)

    def _list(self) -> list[dict] | None:
        """The table as libnftables lists it in JSON, or None when there is none."""
        try:
            flags = self._table_flags()
        except OSError as e:
            raise ApplyError(f"cannot read table {FAMILY} {TABLE}: {e.strerror or e}") from None
        if flags is None:
            return None
        if flags:
            return self._list_flagged(flags)
        return self._list_cmd({"table": {"family": FAMILY, "name": TABLE}})

    def _list_cmd(self, what: dict) -> list[dict] | None:
        rc, out, err = self._json_cmd([{"list": what}])
        if rc != 0:
            if "No such file or directory" in (err or ""):
                return None
            raise ApplyError(_first_error(err))
        if out is None:
            raise ApplyError(f"nft listed {what} without printing it")
        return out["nftables"]

    def _list_flagged(self, flags: int) -> list[dict] | None:
        """The table's objects listed kind by kind, none of which prints the table, with the
        table's flags from netlink. Kinds of objects zddd never writes (quotas, flowtables...)
        are missed here: once the table has no flags, the next read sees and removes them."""
        listing: list[dict] = [{"table": {"family": FAMILY, "name": TABLE,
                                          "flags": _flag_names(flags)}}]
        for kind in ("chains", "maps", "sets"):
            for item in self._list_cmd({kind: {"family": FAMILY}}) or []:
                obj = next(iter(item.values()))
                if obj.get("table") != TABLE:
                    continue
                if "chain" in item:  # the rules come with the chain listed by name
                    listing.extend(self._list_cmd({"chain": {**_REF, "name": obj["name"]}})
                                   or [])
                else:
                    listing.append(item)
        listing.extend(self._list_cmd({"counters": {**_REF}}) or [])
        return [item for item in listing if "metainfo" not in item]

    def read(self, desired: Desired) -> KernelState | None:
        listing = self._list()
        if listing is None:
            return None
        found = Found.parse(listing)
        version = found.version()
        if version is not None:
            NewerLayout.check(f"table {FAMILY} {TABLE}", version, LAYOUT_VERSION)
        problems = diff(found, desired).problems
        if version is not None and version < LAYOUT_VERSION:
            problems.insert(0, f"older layout v{version}")
        return KernelState(weights=weights(found, desired), intact=not problems, found=found,
                           problems=tuple(problems))

    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        change = diff(current.found if current is not None else None, desired)
        return Plan(tuple(change.layout), tuple(change.flip) or None)

    def apply(self, plan: Plan) -> None:
        # Layout and flip go in one transaction: the kernel takes all of it or none.
        if plan:
            self._cmd([{"metainfo": {"json_schema_version": 1}}, *plan.layout,
                       *(plan.flip or ())], "commit")

    def leftover(self, desired: Desired) -> str | None:
        try:
            if self._list() is None:
                return None
        except (ApplyError, ImportError):  # no libnftables binding: nothing it could have left
            return None
        try:
            found = self.read(desired)
            steering = describe(found.weights if found else {})
        except ApplyError as e:
            steering = f"unknown ({e})"
        return f"table {FAMILY} {TABLE} steering {steering}"

    def remove(self, desired: Desired) -> None:
        if self._list() is not None:
            self._cmd([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}], "commit")

    def flows_steered(self) -> dict[tuple[str, str], int]:
        # The two port maps alone (never the table: see the docstring on flags); each element
        # counts the connections its rule redirected, and its comment names the service.
        counts = {}
        for target, name in PORT_MAP.items():
            for item in self._list_cmd({"map": {**_REF, "name": name}}) or []:
                for elem in item.get("map", {}).get("elem", []):
                    key = elem[0] if isinstance(elem, list) and elem else None
                    extra = key.get("elem", {}) if isinstance(key, dict) else {}
                    if isinstance(extra.get("comment"), str):
                        packets = (extra.get("counter") or {}).get("packets", 0)
                        counts[(extra["comment"], target)] = int(packets)
        return counts


def describe(weights: dict[str, int | None]) -> str:
    """Where a table steers, in a few words: "main" with one service, "api main, web off"
    with several; "nothing" when it steers nothing."""
    def one(weight: int | None) -> str:
        target = weight_target(weight)
        return "off" if target is None else f"main {weight}%" if target == "split" else target

    if not any(w is not None for w in weights.values()):
        return "nothing"
    if len(weights) == 1:
        return one(next(iter(weights.values())))
    return ", ".join(f"{name} {one(w)}" for name, w in sorted(weights.items()))
