"""What zddctl says to a first-time user, against a real zddd (issue 8, first contact)."""

from __future__ import annotations


def test_switch_off_while_off_says_already_off(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "off", "--force")
    assert r.returncode == 0 and r.stdout == "switched to off\n", r
    for args in (("switch", "off"), ("switch", "off", "--wait-drained"),
                 ("switch", "off", "--wait-drained=5"), ("switch", "off", "--force")):
        r = z.zddctl(*args)
        assert (r.returncode, r.stdout, r.stderr) == (0, "already off: nothing to drain\n", ""), \
            (args, r)
    assert z.prop("ActiveTarget") == "off" and z.prop("Draining") == ""


def test_switch_off_from_main_still_says_what_it_drains(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "off", "--wait-drained=10")
    assert r.returncode == 0, r
    assert r.stdout == "draining main towards off\nmain is drained\n", r.stdout


def test_non_ascii_target_is_a_clean_invalid_target(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "été", "--wait-drained")
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.startswith("zddctl: InvalidTarget: ") and "été" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert z.prop("ActiveTarget") == "main"
