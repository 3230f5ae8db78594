from zdddlab import APP_V4, http_get


def test_main_then_backup(lab):
    z = lab.start_zddd()
    assert http_get(lab.client, APP_V4, 8888) == "main"
    r = z.zddctl("switch", "backup")
    assert r.returncode == 0, r.stderr
    assert http_get(lab.client, APP_V4, 8888) == "backup"
