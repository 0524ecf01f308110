"""Issue: config file — defaults, per-database overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from walsync_vfs.config import ConfigError, Settings, default_replica, load_toml

GOOD = """
upload_workers = 8
metrics_port = 9464

[defaults]
replica = "s3://bucket/prefix"
upload_interval = 2
retention = 3600

[[databases]]
match = "tenant-*.db"
upload_interval = 0.25

[[databases]]
match = "/srv/special/app.db"
name = "special"
replica = "file:///backups"
"""


def test_defaults_and_overrides_by_glob_and_path():
    s = load_toml(GOOD, "walsync.toml")
    assert (s.upload_workers, s.metrics_port) == (8, 9464)
    plain = s.for_db("/srv/data/other.db")
    assert (plain.replica, plain.name, plain.upload_interval, plain.retention) == (
        "s3://bucket/prefix",
        "other.db",
        2.0,
        3600.0,
    )
    tenant = s.for_db("/srv/data/tenant-42.db")
    assert (tenant.name, tenant.upload_interval) == ("tenant-42.db", 0.25)
    special = s.for_db("/srv/special/app.db")
    assert (special.name, special.replica, special.upload_interval) == (
        "special",
        "file:///backups",
        2.0,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[defaults]\nupload_intervall = 1\n",
            "walsync.toml [defaults]: unknown key 'upload_intervall'; known: compact_segments, "
            "fencing, lease_time, max_segment_bytes, replica, retention, snapshot_interval, "
            "upload_burst, upload_interval",  # no name: it is per database
        ),
        (
            "[defaults]\nupload_interval = -1\n",
            "walsync.toml [defaults]: upload_interval must be >= 0.0, got -1.0",
        ),
        (
            '[defaults]\nupload_burst = "many"\n',
            "walsync.toml [defaults]: upload_burst must be an integer, got 'many'",
        ),
        (
            "[[databases]]\nupload_interval = 1\n",
            'walsync.toml [[databases]] #1: needs match = "<glob>"',
        ),
        (
            '[[databases]]\nmatch = "a"\nname = "../up"\n',
            "walsync.toml [[databases]] #1: invalid database name '../up'",
        ),
        (
            '[[databases]]\nmatch = "a"\nretension = 5\n',
            "walsync.toml [[databases]] #1: unknown key 'retension'",
        ),
        ("upload_workers = 0\n", "walsync.toml: upload_workers must be a positive integer, got 0"),
        ("replicas = 1\n", "walsync.toml: unknown key 'replicas'"),
        ("[defaults\n", "walsync.toml: not valid TOML"),
        ('[defaults]\nname = "x"\n', "walsync.toml [defaults]: name is per database"),
        (
            "[defaults]\nlease_time = nan\n",
            "walsync.toml [defaults]: lease_time must be a finite number, got nan",
        ),
        (
            "[defaults]\nretention = inf\n",
            "walsync.toml [defaults]: retention must be a finite number, got inf",
        ),
        ("metrics_port = 70000\n", "walsync.toml: metrics_port must be a TCP port (1-65535)"),
        ("defaults = 5\n", "walsync.toml: defaults must be written as [defaults] tables"),
        (
            '[databases]\nmatch = "a"\n',
            "walsync.toml: databases must be written as [[databases]] tables",
        ),
        (
            '[defaults]\nreplica = "ftp://host/dir"\n',
            "walsync.toml [defaults]: invalid replica URL 'ftp://host/dir': unsupported scheme",
        ),
        (
            '[[databases]]\nmatch = "a"\nreplica = "s3://Bad_Bucket/x"\n',
            "walsync.toml [[databases]] #1: invalid replica URL 's3://Bad_Bucket/x': "
            "'Bad_Bucket' is not a valid S3 bucket name",
        ),
        (
            '[defaults]\nreplica = "file://relative/dir"\n',
            "walsync.toml [defaults]: invalid replica URL 'file://relative/dir': file URLs need",
        ),
    ],
)
def test_bad_config_names_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        load_toml(text, "walsync.toml")
    assert str(info.value).startswith(message)


def test_name_function_then_overrides():
    s = Settings(name=lambda p: "fn-" + p.rsplit("/", 1)[-1])
    assert s.for_db("/x/a.db").name == "fn-a.db"
    with pytest.raises(ConfigError) as info:
        Settings(name=lambda p: "a/b").for_db("/x/a.db")
    assert str(info.value).startswith("configure(name=...) for /x/a.db: invalid database name")


@pytest.mark.parametrize(
    ("function", "says"),
    [
        (lambda path: "..", ": invalid database name '..'"),
        (lambda path: {}["tenant"], " raised KeyError: 'tenant'"),
    ],
)
def test_a_name_function_giving_a_bad_name_fails_the_open_in_one_line(
    file_replica, tmp_path, caplog, function, says
):
    """The opener gets a ConfigError naming the function and the path, whether the function
    gave a bad name or raised; the log says it in one line, with no traceback."""
    import apsw

    import walsync_vfs

    walsync_vfs.configure(name=function)
    try:
        with pytest.raises(ConfigError) as info:
            apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
        assert str(info.value).startswith(f"configure(name=...) for {tmp_path / 'a.db'}{says}")
        walsync_vfs.flush(timeout=10)
    finally:
        walsync_vfs.configure(name=None)
    assert not [r for r in caplog.records if r.exc_info]


def test_an_attached_database_that_cannot_be_named_fails_flush(file_replica, tmp_path):
    """An ATTACH has no open for the name's ConfigError to fail: flush() raises it instead,
    and stats() says it, rather than a database silently left unreplicated."""
    import apsw

    import walsync_vfs

    walsync_vfs.configure(name=lambda path: "side/x" if path.endswith("side.db") else "main.db")
    con = apsw.Connection(str(tmp_path / "main.db"), vfs="walsync")
    try:
        con.execute(f"ATTACH '{tmp_path / 'side.db'}' AS s")
        con.execute("CREATE TABLE s.t(x); INSERT INTO s.t VALUES (1)")
        says = (
            f"configure(name=...) for {tmp_path / 'side.db'}: invalid database name 'side/x'"
        )
        with pytest.raises(walsync_vfs.ReplicationError) as info:
            walsync_vfs.flush(timeout=10)
        assert str(info.value).startswith(f"replica of {tmp_path / 'side.db'} is failing: {says}")
        (side,) = [s for s in walsync_vfs.stats() if s["path"] == str(tmp_path / "side.db")]
        assert side["last_error"].startswith(says)
        con.execute("DETACH s")
        walsync_vfs.flush(timeout=10)  # once it is closed, nothing of it is waited for
    finally:
        con.close()
        walsync_vfs.configure(name=None)


def test_the_suite_replicates_to_a_default_root_of_its_own(tmp_path_factory):
    """Tests that open databases without a replica of their own must not fill the user's."""
    assert default_replica().startswith(tmp_path_factory.getbasetemp().as_uri() + "/")


def test_a_bad_replica_url_in_the_environment_fails_the_open_in_one_line(
    tmp_path, monkeypatch, caplog
):
    """$WALSYNC_REPLICA is checked where it is used, at the open, not retried at every upload."""
    import apsw

    import walsync_vfs

    monkeypatch.setenv("WALSYNC_REPLICA", "ftp://host/dir")
    with pytest.raises(ConfigError) as info:
        apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
    assert str(info.value).startswith(
        "$WALSYNC_REPLICA: invalid replica URL 'ftp://host/dir': unsupported scheme 'ftp'; use "
    )
    walsync_vfs.flush(timeout=10)
    assert not [r for r in caplog.records if r.exc_info]


def test_a_relative_replica_directory_is_where_configure_was_called(tmp_path, monkeypatch):
    """A daemon that configures, then changes directory, still replicates where it meant."""
    import walsync_vfs

    monkeypatch.chdir(tmp_path)
    walsync_vfs.configure(replica="backups")
    try:
        monkeypatch.chdir("/")
        assert walsync_vfs._settings.defaults.replica_root() == str(tmp_path / "backups")
    finally:
        walsync_vfs.configure(replica="")


def test_a_file_name_that_cannot_be_a_replica_name_fails_the_open_in_one_line(
    file_replica, tmp_path, caplog
):
    import apsw

    import walsync_vfs

    for name, shown in [("a\\b.db", "a\\b.db"), ("new\nline.db", "new\\nline.db")]:
        path = tmp_path / name
        with pytest.raises(ConfigError) as info:
            apsw.Connection(str(path), vfs="walsync")
        assert str(info.value).startswith(f"{tmp_path}/{shown}: invalid database name ")
        assert str(info.value).endswith(
            "; give it a replica name (configure(name=...), or name in a [[databases]] table)"
        )
        assert "\n" not in str(info.value)
    walsync_vfs.flush(timeout=10)
    assert not [r for r in caplog.records if r.exc_info]


def test_a_replica_root_where_no_directory_can_be_is_refused_where_it_is_given(
    tmp_path, monkeypatch
):
    import apsw

    import walsync_vfs
    from walsync_vfs import storage

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(storage.StorageError) as info:
        walsync_vfs.configure(replica=str(afile / "sub"))
    assert str(info.value) == f"replica root {afile / 'sub'} is not a directory; name a directory"
    monkeypatch.setenv("WALSYNC_REPLICA", afile.as_uri())
    with pytest.raises(ConfigError) as info:
        apsw.Connection(str(tmp_path / "a.db"), vfs="walsync")
    assert str(info.value) == (
        f"$WALSYNC_REPLICA: replica root {afile} is not a directory; name a directory"
    )
    walsync_vfs.flush(timeout=10)
