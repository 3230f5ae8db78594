"""The nftables backend: one table, `inet zddd`, changed only in atomic libnftables JSON batches.

Layout (what `nft list table inet zddd` shows):

    table inet zddd {
        counter layout_v1 { }             # the layout version this zddd writes
        counter flows_main { }            # new connections steered, per target
        counter flows_backup { }
        map steer { type inet_service : verdict; elements = { 8888 : goto steer_main } }
        chain steer_main { meta l4proto tcp counter name "flows_main" redirect to :8080 }
        chain steer_backup { meta l4proto tcp counter name "flows_backup" redirect to :80 }
        chain prerouting { type nat hook prerouting priority dstnat; policy accept;
            tcp dport 8888 fib daddr type local tcp dport vmap @steer }
        chain output { type nat hook output priority dstnat; policy accept;
            tcp dport 8888 fib daddr type local tcp dport vmap @steer }
    }

A switch replaces the one element of `steer` (flush + add in one transaction), so it is atomic
and costs one small batch. `off` leaves the map empty: the rule no longer matches and nothing
listens on the listen port, so new connections are refused. The NAT chains stay registered in
`off`, because conntrack keeps translating connections that were redirected before, and that
needs the NAT hooks. Nothing outside the table is ever read or written.

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

from ..kernel import netlink, nfnetlink
from . import ApplyError, Backend, BackendUnavailable, Desired, KernelState, NewerLayout, Plan

FAMILY = "inet"
TABLE = "zddd"
MAP = "steer"
NAT_PRIORITY = -100  # dstnat
LAYOUT_VERSION = 1
_LAYOUT_PREFIX = "layout_v"
_REF = {"family": FAMILY, "table": TABLE}


def _chain_for(target: str) -> str:
    return f"steer_{target}"


def _counter_for(target: str) -> str:
    return f"flows_{target}"


def _tcp_dport() -> dict:
    return {"payload": {"protocol": "tcp", "field": "dport"}}


def _hook_rule(listen_port: int) -> list:
    # The first match is the cheap one; fib keeps zddd from hijacking traffic routed through
    # this host to another machine's port.
    return [
        {"match": {"op": "==", "left": _tcp_dport(), "right": listen_port}},
        {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                   "right": "local"}},
        {"vmap": {"key": _tcp_dport(), "data": "@" + MAP}},
    ]


def _steer_rule(target: str, port: int) -> list:
    return [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
        {"counter": _counter_for(target)},
        {"redirect": {"port": port}},
    ]


def _layout(desired: Desired) -> dict[tuple[str, str], dict]:
    """Every object of the table as nft lists it (minus handles and counter values), by
    (kind, name); chains carry their rules' expressions under "rules"."""
    base = {"family": FAMILY, "table": TABLE}
    objects: dict[tuple[str, str], dict] = {}
    marker = f"{_LAYOUT_PREFIX}{LAYOUT_VERSION}"
    objects[("counter", marker)] = {**base, "name": marker}
    for target, port in desired.ports:
        objects[("counter", _counter_for(target))] = {**base, "name": _counter_for(target)}
        objects[("chain", _chain_for(target))] = {
            **base, "name": _chain_for(target), "rules": [_steer_rule(target, port)]}
    objects[("map", MAP)] = {**base, "name": MAP, "type": "inet_service", "map": "verdict"}
    for hook in ("prerouting", "output"):
        objects[("chain", hook)] = {
            **base, "name": hook, "type": "nat", "hook": hook, "prio": NAT_PRIORITY,
            "policy": "accept", "rules": [_hook_rule(desired.listen_port)]}
    return objects


def _element(desired: Desired) -> list:
    assert desired.active is not None
    return [desired.listen_port, {"goto": {"target": _chain_for(desired.active)}}]


_VOLATILE = ("handle", "packets", "bytes", "elem", "table")


def _comparable(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in _VOLATILE}


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
        # Opened on first use and kept for the backend's life: a libnftables context, and a
        # netlink socket for the table's flags.
        self._nft_context = None
        self._netlink: netlink.Socket | None = None

    def _nft(self):
        if self._nft_context is None:
            import nftables

            nft = nftables.Nftables()
            nft.set_json_output(True)
            nft.set_handle_output(False)
            self._nft_context = nft
        return self._nft_context

    def _json_cmd(self, commands: list) -> tuple[int, dict | None, str]:
        try:
            return self._nft().json_cmd({"nftables": commands})
        except ValueError as e:
            # Should a table gain flags between the netlink read and the listing, nft 1.0.6
            # prints garbage (see the module's docstring), at times not even JSON.
            raise ApplyError(f"nft printed what is not JSON ({e}); is table {FAMILY} {TABLE} "
                             "owned by another process?") from None

    def _cmd(self, commands: list) -> dict | None:
        rc, out, err = self._json_cmd(commands)
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
        found, rules, elements = self._parse(listing)
        for kind, name in found:
            version = name[len(_LAYOUT_PREFIX):]
            if kind == "counter" and name.startswith(_LAYOUT_PREFIX) and version.isdigit():
                NewerLayout.check(f"table {FAMILY} {TABLE}", int(version), LAYOUT_VERSION)
        expected = _layout(desired)
        problems = []
        for item in listing:
            flags = item.get("table", {}).get("flags")
            if flags:  # e.g. dormant: the table is there but its hooks do nothing
                problems.append(f"table flags {', '.join(flags)}")
        for key in sorted(set(found) ^ set(expected)):
            problems.append(f"{key[0]} {key[1]} {'missing' if key in expected else 'foreign'}")
        for key, obj in expected.items():
            if key not in found:
                continue
            want = {k: v for k, v in obj.items() if k != "rules"}
            if _comparable(found[key]) != _comparable(want) or (
                    key[0] == "chain" and not _same_rules(rules.get(key[1], []), obj["rules"])):
                problems.append(f"{key[0]} {key[1]} changed")
        active = None
        by_chain = {_chain_for(t): t for t, _ in desired.ports}
        for key, verdict in elements:
            target = by_chain.get(verdict.get("goto", {}).get("target"))
            if key == desired.listen_port and target and active is None:
                active = target
            else:
                problems.append(f"map {MAP} element {key} foreign")
        return KernelState(active=active, intact=not problems, found=found,
                           problems=tuple(problems))

    @staticmethod
    def _parse(listing: list[dict]):
        found: dict[tuple[str, str], dict] = {}
        rules: dict[str, list] = {}
        elements: list = []
        for item in listing:
            (kind, obj), = item.items()
            if kind in ("metainfo", "table"):
                continue
            if kind == "rule":
                rules.setdefault(obj["chain"], []).append(obj["expr"])
                continue
            found[(kind, obj["name"])] = obj
            if kind == "map" and obj["name"] == MAP:
                elements = [tuple(e) for e in obj.get("elem", [])]
        return found, rules, elements

    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        flip = None
        if current is None or not current.intact or current.active != desired.active:
            flip = tuple(self._steering(desired))
        if current is not None and current.intact:
            return Plan((), flip)
        return Plan(tuple(self._full(current.found if current else {}, desired)), flip)

    @staticmethod
    def _steering(desired: Desired) -> list:
        ref = {"family": FAMILY, "table": TABLE, "name": MAP}
        commands: list = [{"flush": {"map": ref}}]
        if desired.active is not None:
            commands.append({"add": {"element": {**ref, "elem": [_element(desired)]}}})
        return commands

    @staticmethod
    def _full(found: dict, desired: Desired) -> list:
        """Declare the whole table, given the objects `read` found. Objects that are there but
        differ, or that zddd would not have written, are removed first; the table itself is
        never deleted, so the NAT hooks stay registered throughout."""
        expected = _layout(desired)
        # No flags: a table someone made dormant wakes up again.
        table = {"family": FAMILY, "name": TABLE, "flags": []}
        commands: list = [{"add": {"table": table}}]
        # References first: rules and map elements can point at objects about to go.
        for (kind, name) in found:
            if kind == "chain":
                commands.append({"flush": {"chain": {**_REF, "name": name}}})
            elif kind in ("map", "set"):
                commands.append({"flush": {kind: {**_REF, "name": name}}})
        for key, obj in found.items():
            want = expected.get(key)
            if want is None or _comparable(obj) != _comparable(
                    {k: v for k, v in want.items() if k != "rules"}):
                commands.append({"delete": {key[0]: {**_REF, "name": key[1]}}})
        for (kind, _), obj in expected.items():
            commands.append({"add": {kind: {k: v for k, v in obj.items() if k != "rules"}}})
        for (_, name), obj in expected.items():
            for expr in obj.get("rules", []):
                commands.append({"add": {"rule": {**_REF, "chain": name, "expr": expr}}})
        return commands

    def apply(self, plan: Plan) -> None:
        # Layout and flip go in one transaction: the kernel takes all of it or none.
        if plan:
            self._cmd(list(plan.layout) + list(plan.flip or ()))

    def leftover(self, desired: Desired) -> str | None:
        try:
            if self._list() is None:
                return None
        except (ApplyError, ImportError):  # no libnftables binding: nothing it could have left
            return None
        try:
            found = self.read(desired)
            steering = (found.active if found else None) or "nothing"
        except ApplyError as e:
            steering = f"unknown ({e})"
        return f"table {FAMILY} {TABLE} steering {steering}"

    def remove(self, desired: Desired) -> None:
        if self._list() is not None:
            self._cmd([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}])

    def flows_steered(self) -> dict[str, int]:
        listing = self._list() or []
        counts = {}
        for item in listing:
            obj = item.get("counter")
            if obj and obj["name"].startswith("flows_"):  # not layout_vN
                counts[obj["name"][len("flows_"):]] = int(obj.get("packets", 0))
        return counts

