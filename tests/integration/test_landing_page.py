"""The landing page in a real headless Chromium: what an on-call person reads at /."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from tests.integration.daemonproc import DaemonProcess, bridge, enqueue_all, wait_for
from tests.nixhelpers import build, narinfo


class _Text(HTMLParser):
    """The text a person sees, and the elements the page holds."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self.tags: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("style", "title", "script"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "title", "script"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    """Debian's chromium, headless (the test setup installs it)."""
    binary = shutil.which("chromium")
    assert binary, "chromium missing: the test command installs Debian's chromium"
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={user_data}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_landing_page_tells_the_story_in_a_real_browser(
    daemon_factory: Callable[..., DaemonProcess],
    tmp_path: Path,
    workdir: Path,
    fake_cachix: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    mirror = tmp_path / "mirror"
    built = build(workdir, 3)
    poison = built[0]
    daemon = daemon_factory(
        "[push]\nmax_attempts = 1\nbackoff_initial_seconds = 0.1\nbackoff_max_seconds = 0.2\n"
        f'[caches.team]\nbackend = "cachix"\nauth_token_file = "{token}"\n'
        f'[caches.mirror]\nbackend = "nix-copy"\nuri = "file://{mirror}"\n',
        env={"FAKE_CACHIX_FAIL_PATHS": poison.name},
        extra_top=f'[[log_sources]]\npath = "{tmp_path / "missing.log"}"\n',
    )
    enqueue_all(daemon, tmp_path, built)
    wait_for(lambda: all(narinfo(mirror, b).is_file() for b in built), message="mirror")
    # Recorded once nix copy has exited, after the narinfo files appeared.
    wait_for(lambda: daemon.counts("mirror").get("pushed") == 3, message="mirror recorded")
    wait_for(lambda: daemon.counts("team").get("dead") == 1, message="dead letter")
    # The poison path's last push may take team down for a moment, until a probe with a
    # path it already has (0.1 to 0.2 s later here) brings it back up.
    wait_for(
        lambda: (
            {c["cache"]: c["state"] for c in daemon.status()["caches"]}
            == {"team": "up", "mirror": "up"}
        ),
        message="both caches up",
    )
    # A payload enqueue-hydra refuses, and an event file whose name is markup.
    bad = tmp_path / "bad.json"
    bad.write_text("{broken")
    refused = bridge(
        "enqueue-hydra", "--config", str(daemon.config), "--json-file", str(bad), env=daemon.env
    )
    assert refused.returncode == 1
    incoming = tmp_path / "state" / "spool" / "incoming"
    (incoming / "<em>bold.json").write_text("[]")
    wait_for(lambda: daemon.status()["quarantine"]["count"] == 2, message="quarantine")

    url = f"http://127.0.0.1:{daemon.port}/"
    dom = chromium("--dump-dom", url, user_data=tmp_path / "chromium")
    assert dom.returncode == 0, dom.stderr
    page = _Text()
    page.feed(dom.stdout)
    text = " ".join(" ".join(page.chunks).split())

    assert "script" not in page.tags  # plain HTML, no JavaScript
    assert "em" not in page.tags, "a file name was rendered as markup"
    assert "<em>bold.json" in text  # shown as the text it is
    assert "Health: healthy" in text
    # Per cache: its state and counts. team took the poison path's batch-mates after the
    # failure, so it is up; the poison path is a dead letter.
    assert "team up since" in text and "mirror up since" in text
    assert re.search(r"mirror up since \d+s ago takes pushes 0 0 3 0 0 ", text), text
    # Dead letters, with the command that puts them back.
    assert "1 path(s) exhausted their attempts" in text
    assert f"hydra-cachix-bridge retry --config {daemon.config} --all" in text
    assert poison.out in text
    assert "Last error per cache:" in text and "team (" in text
    # Quarantined files with their reasons.
    assert "2 rejected event file(s)" in text and "invalid_json" in text
    # Log sources and links.
    assert re.search(re.escape(str(tmp_path / "missing.log")) + r" ?: not readable", text)
    for link in ('href="/metrics"', 'href="/healthz"'):
        assert link in dom.stdout

    # Set LANDING_SCREENSHOT=FILE to keep the picture beyond pytest's temporary directories.
    screenshot = Path(os.environ.get("LANDING_SCREENSHOT") or tmp_path / "landing.png")
    shot = chromium(
        f"--screenshot={screenshot}", "--window-size=1280,1200", url, user_data=tmp_path / "c2"
    )
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr
    print(f"\nscreenshot of / saved at {screenshot}")
