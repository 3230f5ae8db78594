"""What zddd owns outside the bus, and when: its listeners exist before it reports ready or
reloaded (or it fails, naming them, with nothing changed); `--remove-data-plane` is the way out;
tables of other layout versions; repairs that do not hold back off."""

import json
import subprocess
import time

import pytest
from zdddlab import APP_V4, VENV_BIN, agent_ask, connect_error, http_get, wait_for, without_counters


def squat(ns, port: int, host: str = "0.0.0.0"):
    """A listener in `ns` holding `port` (a child process), so zddd cannot bind it."""
    script = ("import socket,sys,time; s=socket.socket(); s.bind((sys.argv[1], int(sys.argv[2])));"
              " s.listen(); print('ok', flush=True); time.sleep(600)")
    proc = ns.popen("/usr/bin/python3", "-c", script, host, str(port), stdout=subprocess.PIPE,
                    text=True)
    assert proc.stdout.readline().strip() == "ok"
    return proc


@pytest.mark.parametrize("section,port", [("agent", 8889), ("metrics", 9488)])
def test_a_listener_that_cannot_bind_fails_the_start_before_the_kernel_is_touched(lab, section,
                                                                                  port):
    squat(lab.app, port, "127.0.0.1" if section == "metrics" else "0.0.0.0")
    z = lab.start_zddd(wait=False)
    assert z.proc.wait(timeout=15) == 78, z.log()
    assert f"{section}.listen: cannot listen on" in z.log(), z.log()
    assert z.nft() == {} and not z.state_path.exists()
    assert not z.owns_name()


def test_a_reload_onto_a_taken_port_fails_and_keeps_every_listener(lab):
    z = lab.start_zddd()
    squat(lab.app, 8899)
    z.config["agent"] = {"listen": "0.0.0.0:8899"}
    z.config["metrics"] = {"listen": "127.0.0.1:9499"}
    z.config["drain_timeout"] = 3
    z.write_config()
    r = z.zddctl("reload")
    assert r.returncode == 1 and "agent.listen: cannot listen on 0.0.0.0:8899" in r.stderr, r
    # Nothing of the new config took: old agent, old metrics port, old drain timeout.
    assert agent_ask(lab.client, APP_V4) == "ready up"
    assert connect_error(lab.app, "127.0.0.1", 9488)[0] == "ok"
    assert connect_error(lab.app, "127.0.0.1", 9499)[0] == "ECONNREFUSED"
    assert z.prop("DrainTimeoutUSec") == 10_000_000


def test_a_reload_to_a_state_file_that_cannot_be_written_changes_nothing(lab):
    z = lab.start_zddd()
    blocker = lab.tmp / "not-a-dir"
    blocker.write_text("")
    z.config["state_file"] = str(blocker / "state.json")
    z.config["drain_timeout"] = 3
    z.write_config()
    r = z.zddctl("reload")
    assert r.returncode == 1 and "cannot save the state" in r.stderr, r
    assert z.prop("DrainTimeoutUSec") == 10_000_000
    assert z.call("Switch", "s", "backup")[0] is None
    assert json.loads(z.state_path.read_text())["target"] == "backup"  # the old file


def remove_data_plane(z) -> subprocess.CompletedProcess:
    return z.ns.run(str(VENV_BIN / "zddd"), "--config", str(z.config_path),
                    "--remove-data-plane", check=False)


def test_remove_data_plane_refuses_while_zddd_runs_then_removes_everything(lab):
    z = lab.start_zddd()
    assert z.call("Switch", "s", "backup")[0] is None
    r = remove_data_plane(z)
    assert r.returncode == 1 and "stop it first" in r.stderr, r
    assert z.steered_to() == "backup"
    z.kill()
    assert http_get(lab.client, APP_V4, 8888) == "backup"  # the data plane outlived zddd
    r = remove_data_plane(z)
    assert r.returncode == 0, r
    assert "removed the nftables data plane: table inet zddd steering backup" in r.stdout
    assert z.nft() == {} and not z.state_path.exists()
    assert connect_error(lab.client, APP_V4, 8888)[0] == "ECONNREFUSED"
    # Nothing left: a second run has nothing to say, and a new zddd starts on `initial`.
    assert remove_data_plane(z).stdout == ""
    z.start()
    assert z.prop("ActiveTarget") == "main"


def test_a_table_of_a_newer_layout_is_left_alone(lab):
    lab.app.run("nft", "add table inet zddd; add counter inet zddd layout_v99")
    z = lab.start_zddd(wait=False)
    # 78: no restart of this zddd helps, so systemd must not loop on it; one line says the way out.
    assert z.proc.wait(timeout=15) == 78, z.log()
    refused = [line for line in z.log().splitlines() if "level=error" in line]
    assert len(refused) == 1 and "layout v99, written by a newer zddd" in refused[0], z.log()
    assert "--remove-data-plane" in refused[0] and "install the newer zddd" in refused[0]
    names = {next(iter(item.values())).get("name") for item in z.nft()["nftables"]}
    assert names == {"zddd", "layout_v99", None}  # table, counter, metainfo: untouched


def test_a_table_of_an_older_layout_is_rewritten_without_a_flip(lab):
    z = lab.start_zddd()
    assert z.call("Switch", "s", "backup")[0] is None
    z.kill()
    # What zddd 0.1 wrote: the same objects, no layout marker.
    from zddd.backends.nftables import LAYOUT_VERSION

    marker = f"layout_v{LAYOUT_VERSION}"
    lab.app.run("nft", f"delete counter inet zddd {marker}")
    held = socket_held(lab)
    z.start()
    assert z.prop("ActiveTarget") == "backup"
    assert "event=start how=adopted target=backup" in z.log()
    assert any(next(iter(i.values())).get("name") == marker for i in z.nft()["nftables"])
    assert held() == "backup"


def socket_held(lab):
    """A keep-alive connection through 8888; returns a function that asks it again."""
    from zdddlab import KeepAlive

    k = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(k.close)
    first = k.get()
    return lambda: first if k.get() == first else None


def test_a_repair_that_does_not_hold_backs_off_and_says_so_once(lab):
    z = lab.start_zddd()
    # Someone undoes zddd's repair as soon as it is made, forever.
    fighter = lab.app.popen("sh", "-c", "while :; do nft flush chain inet zddd steer_main "
                                        "2>/dev/null; sleep 0.02; done")
    time.sleep(6)
    fighter.kill()
    log = z.log()
    assert log.count("event=repair_not_holding") == 1, log
    # Without the back-off: a rewrite and a warning every 0.25 s, 24 in 6 s.
    assert log.count("event=drift_repaired") <= 2, log
    # Once left alone, the next repair holds and zddd says so.
    wait_for(lambda: "event=repair_holds" in z.log(), 70, "the repair to hold")
    assert http_get(lab.client, APP_V4, 8888) == "main"
    before = without_counters(z.nft())
    time.sleep(0.6)
    assert without_counters(z.nft()) == before


def test_a_burst_of_sighups_collapses_into_few_reloads_and_ends_on_the_file(lab):
    """Repeated SIGHUPs during a reload are one more reload (not one task each, not reloads
    side by side); the last reload reads the file as it is at the end."""
    import signal

    z = lab.start_zddd()
    z.config["drain_timeout"] = 7
    z.config["agent"] = {"listen": "0.0.0.0:8899"}  # a reload that moves a listener awaits
    z.write_config()
    for _ in range(200):
        z.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: z.prop("DrainTimeoutUSec") == 7_000_000, 5, "the SIGHUP reload")
    time.sleep(0.5)
    log = z.log()
    reloads = sum(1 for ln in log.splitlines() if ln.endswith("event=reload"))
    print(f"200 SIGHUPs: {reloads} reloads")
    assert 1 <= reloads < 200, log
    assert "reload_failed" not in log and "reload_refused" not in log, log
    assert z.proc.poll() is None
    assert agent_ask(lab.client, APP_V4, 8899) == "ready up"
    assert connect_error(lab.client, APP_V4, 8889)[0] == "ECONNREFUSED"
