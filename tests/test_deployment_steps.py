"""docs/deployment.md's plain-systemd steps, run in a scratch root: who may read and write what.

The shell block of the guide is the test's input (only `pip`, `systemctl` and `$EDITOR`
lines are left out, a config is written where the editor would be). Permissions are then
checked by the kernel: a forked child takes the uid and groups that the scratch root's
etc/passwd and etc/group give RunCommand's user and the daemon's user.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import pytest
from click.testing import CliRunner

from bridge import cli, producers, spooltarget
from bridge.spool import SpoolLayout, write_hook_event
from tests.asuser import run_as
from tests.nixhelpers import Built, hydra_payload

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs/deployment.md"
SECTION = "## Plain systemd (any distribution)"
LEFT_OUT = ("pip ", "systemctl ", "$EDITOR ")  # installs software, starts services, interactive
TOOLS = ("systemd-sysusers", "systemd-tmpfiles", "useradd", "usermod", "bash", "awk")
RUNNER = "hydra-queue-runner"
DAEMON = "hydra-cachix-bridge"
PRODUCERS = "hydra-cachix-bridge-producers"
T = TypeVar("T")
TOKEN = "cachix-secret-token-not-for-producers"
OUT = "/nix/store/2jmiqxxd2z4ypk8am71rc6kffqzgma57-t"
ITEM = Built("t", "/nix/store/hb09lmdvs22v5ianga0vgpi9k446q3kw-t.drv", OUT)

# enqueue-hydra imports these lazily; the forked child must find them loaded, since the
# interpreter's own library may be readable by root alone.
PRELOADED = (producers, spooltarget)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running the guide's steps needs root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in TOOLS),
        reason=f"needs {', '.join(TOOLS)} (Debian: apt-get install systemd passwd)",
    ),
]

# Names in `install -o/-g`, `chown` and `chgrp` resolve through the host's NSS; in the scratch
# root they must resolve from its own etc/passwd and etc/group (as systemd-tmpfiles --root
# and usermod --prefix do), so these wrappers turn them into the scratch root's numbers.
PROLOGUE = r"""set -euo pipefail
umask 022
hydra-cachix-bridge() { "$HCB_PYTHON" -m bridge "$@"; }
_id() {
  case $2 in
    *[!0-9]*) awk -F: -v n="$2" '$1 == n {print $3; f = 1} END {exit !f}' "$ROOT/etc/$1" ;;
    *) echo "$2" ;;
  esac
}
install() {
  local args=()
  while [ $# -gt 0 ]; do
    case $1 in
      -o) args+=(-o "$(_id passwd "$2")"); shift 2 ;;
      -g) args+=(-g "$(_id group "$2")"); shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  command install "${args[@]}"
}
chown() {
  local u=${1%%:*} g=${1#*:}; shift
  command chown "$(_id passwd "$u"):$(_id group "$g")" "$@"
}
chgrp() { local g=$1; shift; command chgrp "$(_id group "$g")" "$@"; }
"""


class Account(NamedTuple):
    """A user as the scratch root records it: what the kernel checks."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def fenced_block(text: str, after: str, language: str) -> str:
    """The first ```language block after the line `after`."""
    start = text.index(after)
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.M | re.S).search(text, start)
    assert match is not None, f"no ```{language} block after {after!r}"
    return match.group(1)


def steps_script(guide: str, root: Path, config: str) -> str:
    """The guide's plain-systemd block as a bash script against `root`."""
    lines = fenced_block(guide, SECTION, "sh").splitlines()
    assert re.fullmatch(r"ROOT=\s*(#.*)?", lines[0]), "the block must start with `ROOT=`"
    body = [f"ROOT={root}"]
    for line in lines[1:]:
        if line.startswith("$EDITOR "):
            target = line.split()[1]
            body.append(f"cat > {target} <<'HCB_CONFIG'\n{config}HCB_CONFIG")
        elif not line.startswith(LEFT_OUT):
            # Every absolute path must be under $ROOT: a line that missed it would change
            # this host (only /dev/stdin is exempt).
            stray = re.search(r"(?:^|[\s\"'=])/(?!dev/stdin\b)\S*", line.split("#", 1)[0])
            assert stray is None, f"absolute path outside $ROOT in: {line}"
            body.append(line)
    return PROLOGUE + "\n".join(body) + "\n"


def scratch_distribution(root: Path) -> None:
    """An empty root as a distribution has it, with Hydra's RunCommand user already made."""
    for directory in ("etc/sysusers.d", "etc/tmpfiles.d", "etc/systemd/system"):
        (root / directory).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).write_text("root:*::\n" if name == "gshadow" else "root:*:1::::::\n")
        (root / "etc" / name).chmod(0o600)
    subprocess.run(
        ["useradd", "--prefix", str(root), "--system", "--user-group", "--no-create-home",
         "--shell", "/usr/sbin/nologin", RUNNER],
        check=True, capture_output=True, text=True,
    )  # fmt: skip


def account(root: Path, name: str) -> Account:
    """uid, primary gid and every group of `name` in root's etc/passwd and etc/group."""
    users = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    (entry,) = [fields for fields in users if fields[0] == name]
    uid, gid = int(entry[2]), int(entry[3])
    groups = {gid}
    for fields in (line.split(":") for line in (root / "etc/group").read_text().splitlines()):
        if name in fields[3].split(","):
            groups.add(int(fields[2]))
    return Account(uid, gid, tuple(sorted(groups)))


def group_id(root: Path, name: str) -> int:
    """The gid of group `name` in root's etc/group."""
    for fields in (line.split(":") for line in (root / "etc/group").read_text().splitlines()):
        if fields[0] == name:
            return int(fields[2])
    raise LookupError(name)


def as_account(who: Account, func: Callable[[], T]) -> T:
    """func() in a child with exactly who's uid and groups."""
    result: T = run_as(who.uid, who.gid, func, groups=who.groups)
    return result


def denied(action: Callable[[], object]) -> Callable[[], str]:
    """A check that `action` fails with EACCES/EPERM, returning what happened."""

    def check() -> str:
        try:
            action()
        except PermissionError:
            return "denied"
        return "allowed"

    return check


@pytest.fixture
def deployed(shared_tmp: Path) -> Path:
    """A scratch root after the guide's steps."""
    root = shared_tmp
    scratch_distribution(root)
    config = fenced_block(GUIDE.read_text(), "A config for this layout:", "toml")
    config = config.replace('"/var/', f'"{root}/var/')
    assert f'spool_dir = "{root}/var/spool/' in config and "group_writable = true" in config
    script = steps_script(GUIDE.read_text(), root, config)
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        env={**os.environ, "HCB_PYTHON": sys.executable, "TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the guide's steps failed:\n{done.stderr}"
    return root


def test_runcommand_user_reads_the_config_and_writes_the_spool(deployed: Path) -> None:
    root = deployed
    config = root / "etc/hydra-cachix-bridge/config.toml"
    token = root / "etc/hydra-cachix-bridge/cachix-token"
    layout = SpoolLayout(root / "var/spool/hydra-cachix-bridge")
    runner = account(root, RUNNER)
    producers = group_id(root, PRODUCERS)
    assert producers in runner.groups, f"{RUNNER} is not in {PRODUCERS}"
    payload = root / "hydra.json"
    payload.write_text(json.dumps(hydra_payload(7, ITEM)))
    payload.chmod(0o644)

    # (a) the config, read as enqueue-hydra reads it
    assert as_account(runner, config.read_text) == config.read_text()
    # (b) enqueue-hydra's own command, in the child (the venv's interpreter is root's alone,
    # so the child runs the command in-process rather than exec'ing python)
    args = ["enqueue-hydra", "--config", str(config), "--json-file", str(payload)]

    def enqueue() -> tuple[int, str]:
        result = CliRunner().invoke(cli.main, args)
        return result.exit_code, result.output

    status, output = as_account(runner, enqueue)
    assert status == 0 and "recorded build 7 (proj:main:pkg.x86_64-linux)" in output, output
    (event,) = layout.incoming.iterdir()
    assert (event.stat().st_uid, event.stat().st_gid) == (runner.uid, producers)
    assert json.loads(event.read_text())["payload"]["build"] == 7
    assert list(layout.tmp.iterdir()) == []
    # (c) not the cachix token
    assert as_account(runner, denied(token.read_text)) == "denied"
    assert token.read_text().strip() == TOKEN
    # (d) not the hook's channel
    forged = layout.hook / "hook-forged.json"
    write = denied(lambda: os.close(os.open(forged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)))
    assert as_account(runner, write) == "denied"
    assert not forged.exists()


def test_daemon_user_reads_the_config_and_the_hook_and_owns_incoming(deployed: Path) -> None:
    root = deployed
    config = root / "etc/hydra-cachix-bridge/config.toml"
    token = root / "etc/hydra-cachix-bridge/cachix-token"
    layout = SpoolLayout(root / "var/spool/hydra-cachix-bridge")
    daemon = account(root, DAEMON)
    hook_event = write_hook_event(layout, {"kind": "hook", "out_paths": [ITEM.out]})

    def daemon_work() -> tuple[str, str, list[str]]:
        text = config.read_text()
        name = "hydra-1-1-daemon.json"
        fd = os.open(layout.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        os.close(fd)
        os.rename(layout.tmp / name, layout.incoming / name)
        (layout.incoming / name).unlink()  # the daemon removes what it has ingested
        return text, hook_event.read_text(), os.listdir(layout.hook)

    text, hook_text, hook_names = as_account(daemon, daemon_work)
    assert text == config.read_text()
    assert json.loads(hook_text)["out_paths"] == [ITEM.out]
    assert hook_names == [hook_event.name]
    # secrets reach the daemon through LoadCredential= (read by systemd as root), not the file
    assert as_account(daemon, denied(token.read_text)) == "denied"
    # and it cannot delete or add the hook's files
    assert as_account(daemon, denied(hook_event.unlink)) == "denied"
    forged = layout.hook / "hook-forged.json"
    write = denied(lambda: os.close(os.open(forged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)))
    assert as_account(daemon, write) == "denied"


def test_config_and_secret_modes(deployed: Path) -> None:
    etc = deployed / "etc/hydra-cachix-bridge"
    producers = group_id(deployed, PRODUCERS)

    def owner_mode(path: Path) -> tuple[int, int, int]:
        info = path.stat()
        return info.st_uid, info.st_gid, info.st_mode & 0o7777

    assert owner_mode(etc) == (0, producers, 0o750)
    assert owner_mode(etc / "config.toml") == (0, producers, 0o640)
    assert owner_mode(etc / "cachix-token") == (0, 0, 0o600)
