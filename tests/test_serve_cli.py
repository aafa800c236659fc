"""``solar-edge serve`` hands out only repository files; serve and agent fail in one line;
``agent --json`` prints one object even when the cycle fails."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from cli_main import run_main

from solar_edge.devices.server import RepoServer


def _status(server: RepoServer, path: str) -> int:
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_server_never_serves_keys_or_dotfiles_and_keeps_to_its_folders(tmp_path):
    for rel in ("metadata/1.root.json", "targets/a/x.slr", "signing.key", "metadata/x.key",
                "metadata/.hidden", ".git/config", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "targets/link.slr").symlink_to(tmp_path / "signing.key")
    with RepoServer(tmp_path, only=("metadata", "targets")) as server:
        assert _status(server, "/metadata/1.root.json") == 200
        assert _status(server, "/targets/a/x.slr") == 200
        for path in ("/signing.key", "/metadata/x.key", "/metadata/.hidden", "/.git/config",
                     "/notes.txt", "/targets/link.slr"):
            assert _status(server, path) == 404, path


def _never_serve(monkeypatch) -> None:
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        raise AssertionError("serve started instead of refusing")

    monkeypatch.setattr(RepoServer, "serve_forever", serve_forever)


def test_serve_refuses_a_folder_that_holds_a_private_key(tmp_path, monkeypatch, capsys):
    _never_serve(monkeypatch)
    (tmp_path / "metadata").mkdir()
    (tmp_path / "signing.key").write_text("secret")
    code, _, err = run_main(monkeypatch, capsys, "serve", str(tmp_path), "--port", "0")
    assert code == 2 and "holds a private key (signing.key)" in err and "Traceback" not in err


def test_publish_refuses_to_write_a_repository_into_a_key_folder(tmp_path, monkeypatch, capsys):
    from solar_edge.format import signing

    key = signing.save_private_key(signing.generate_private_key(), tmp_path / "signing.key")
    packet = tmp_path / "p.slr"
    packet.write_bytes(b"not read: the folder is checked first")
    code, _, err = run_main(monkeypatch, capsys, "publish", str(packet), "--signing-key",
                            str(key), "--out", str(tmp_path))
    assert code == 2 and "holds a private key (signing.key)" in err and "published" in err
    assert not (tmp_path / "metadata").exists()


@pytest.mark.parametrize("host", ["256.1.1.1", None])
def test_serve_reports_an_unusable_address_in_one_line(tmp_path, monkeypatch, capsys, host):
    _never_serve(monkeypatch)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        where = ["--host", host] if host else ["--port", str(busy.getsockname()[1])]
        code, _, err = run_main(monkeypatch, capsys, "serve", str(tmp_path), *where)
    finally:
        busy.close()
    assert code == 1 and err.startswith("error: cannot listen on") and len(err.splitlines()) == 1


def _agent_args(tmp_path, *extra: str) -> list[str]:
    key = tmp_path / "k.pub"
    key.write_text("unused")
    (tmp_path / "bundle").mkdir(exist_ok=True)
    return ["agent", "--server", "http://127.0.0.1:9", "--bundle", str(tmp_path / "bundle"),
            "--trusted-key", str(key), "--state", str(tmp_path / "state"), *extra]


@pytest.mark.parametrize("interval", ["-1", "nan", "inf"])
def test_agent_refuses_a_bad_interval_before_any_cycle(tmp_path, monkeypatch, capsys, interval):
    code, _, err = run_main(monkeypatch, capsys,
                            *_agent_args(tmp_path, "--cycles", "2", "--interval", interval))
    assert code == 2 and "--interval" in err and "finite number" in err


def test_agent_json_prints_one_object_when_the_cycle_fails(rig, tmp_path, monkeypatch, capsys):
    import solar_edge.devices.cli as devices_cli
    from solar_edge.devices.agent import RetryPolicy
    from solar_edge.format import signing

    rig.publish(rig.packet("a", 1))
    rig.start()
    unreachable = socket.socket()
    unreachable.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{unreachable.getsockname()[1]}"
    unreachable.close()
    agent = rig.agent(url=url, retry=RetryPolicy(attempts=1))
    monkeypatch.setattr(devices_cli, "build_runtime_agent", lambda *a, **k: agent)
    monkeypatch.setattr(signing, "load_public_key", lambda path: None)
    code, out, _ = run_main(monkeypatch, capsys, *_agent_args(tmp_path, "--once", "--json"))
    doc = json.loads(out)
    assert code == 2 and doc["exit_code"] == 2 and doc["error"].startswith("DownloadError")
