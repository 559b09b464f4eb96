"""The NixOS module, evaluated: real nixpkgs lib, stub NixOS options and stub pkgs.

tests/nixos-eval/eval.nix runs `lib.evalModules` once per case of tests/nixos-eval/cases.nix
in a single `nix-instantiate --eval --strict --json`; this file asserts on what each case
produced (the unit, users, tmpfiles, Hydra's extraConfig, the rendered settings, ...).
A deliberately broken copy of the module must fail these same checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.config import Config, parse_config
from bridge.settings import declared_defaults

pytestmark = pytest.mark.nix

ROOT = Path(__file__).resolve().parent.parent
NIXOS = ROOT / "nixos"
EVAL = ROOT / "tests" / "nixos-eval" / "eval.nix"
SPOOL = "/var/spool/hydra-cachix-bridge"
GROUP = "hydra-cachix-bridge-producers"
STORE = "/nix/store/"
# The NixOS default differs from the daemon's on purpose: RunCommand and the hook write the spool.
MODULE_ONLY_DEFAULTS = {"spool.group_writable": True}

Result = dict[str, Any]


def nixpkgs_lib() -> Path:
    """The nixpkgs lib: $HCB_NIXPKGS_LIB or <repo>/../shared/nixpkgs-lib/lib."""
    return Path(os.environ.get("HCB_NIXPKGS_LIB") or ROOT.parent / "shared/nixpkgs-lib/lib")


def nix_version() -> tuple[int, ...]:
    """The version of the nix-instantiate on PATH."""
    done = subprocess.run(
        ["nix-instantiate", "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", done.stdout)
    assert found, done.stdout
    return tuple(int(part or 0) for part in found.groups())


def evaluate(
    nixos_dir: Path, *, only: str = "", catch: bool = True, with_package: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run eval.nix against a nixos/ directory; returns the finished process."""
    args = ["nix-instantiate", "--eval", "--strict", "--json", str(EVAL)]
    args += ["--argstr", "lib", str(nixpkgs_lib()), "--argstr", "nixosDir", str(nixos_dir)]
    args += ["--argstr", "only", only]
    args += ["--arg", "catch", "true" if catch else "false"]
    args += ["--arg", "withPackage", "true" if with_package else "false"]
    if with_package:
        # package.nix's source is a lib.fileset copy into the store, which `--eval` alone
        # (read-only since Nix 2.x) computes but never writes; the check reads that copy.
        args.append("--read-write-mode")
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=300)


def evaluate_cases(nixos_dir: Path, only: str = "") -> dict[str, Any]:
    """Every selected case's {ok, result}, failing the test on an evaluation error."""
    done = evaluate(nixos_dir, only=only)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout)["cases"])


@pytest.fixture(scope="module", autouse=True)
def _requirements() -> None:
    assert shutil.which("nix-instantiate"), (
        "nix-instantiate missing: the test command installs nix-bin"
    )
    if not (nixpkgs_lib() / "default.nix").is_file():
        pytest.skip(f"nixpkgs lib not found at {nixpkgs_lib()} (set HCB_NIXPKGS_LIB)")


@pytest.fixture(scope="module")
def evaluated(_requirements: None) -> dict[str, Any]:
    """All cases of the real module, plus package.nix where this Nix can evaluate lib.fileset."""
    done = evaluate(NIXOS, with_package=nix_version() >= (2, 14))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


# --- checks every successful case must pass -------------------------------------------------


def writable_dirs(unit: Result) -> list[str]:
    """Directories the unit may write under ProtectSystem=strict."""
    config = unit["serviceConfig"]
    dirs = list(config.get("ReadWritePaths", []))
    if "StateDirectory" in config:
        dirs.append("/var/lib/" + config["StateDirectory"])
    return dirs


def is_writable(unit: Result, path: str) -> bool:
    """Whether path is, or lies under, a writable directory of the unit."""
    path = path.rstrip("/") or "/"
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in writable_dirs(unit))


def local_store_dir(uri: str) -> str | None:
    """The directory `nix copy --to uri` writes, for a file:// or absolute-path store."""
    location = uri.split("?", 1)[0]
    if location.startswith("file://"):
        return location.removeprefix("file://")
    return location if location.startswith("/") else None


def check_invariants(r: Result) -> None:
    """What holds for every enabled configuration without failed assertions."""
    unit = r["unit"]
    settings = r["settings"]
    config = unit["serviceConfig"]
    # Every directory the daemon writes is writable in the unit ...
    for directory in [settings["spool_dir"], settings["state_dir"]] + [
        d for d in (local_store_dir(c.get("uri", "")) for c in settings["caches"].values()) if d
    ]:
        assert is_writable(unit, directory), (directory, writable_dirs(unit))
    # ... and exists when the unit starts (a missing ReadWritePaths entry fails the start).
    made = {rule.split()[1] for rule in r["tmpfiles"] if rule.startswith("d ")}
    for directory in config.get("ReadWritePaths", []):
        assert directory in made or directory == "/extra", (directory, made)
    # Secrets: credential names in the file, runtime paths outside the store in the unit.
    for entry, has_context in zip(
        config["LoadCredential"], unit["loadCredentialHasContext"], strict=True
    ):
        name, path = entry.split(":", 1)
        assert not path.startswith(STORE) and path.startswith("/"), entry
        assert not has_context, entry
    for cache in settings["caches"].values():
        for key in ("auth_token_file", "signing_key_file"):
            assert "/" not in cache.get(key, ""), cache
    # Users and groups complete, as NixOS's users module demands.
    for name, user in r["users"].items():
        system = user["isSystemUser"] or (user["uid"] is not None and user["uid"] < 1000)
        assert system != user["isNormalUser"], name
        assert user["group"] in r["groups"], (name, user["group"])
        for group in user["extraGroups"]:
            assert group in r["groups"], (name, group)
    assert config["User"] in r["users"] or config["User"] != "hydra-cachix-bridge"
    assert config["Group"] in r["groups"]
    # ssh exactly when a cache needs it.
    uris = [c.get("uri", "") for c in settings["caches"].values()]
    needs_ssh = any(u.startswith(("ssh://", "ssh-ng://")) for u in uris)
    assert ("openssh" in unit["path"]) == needs_ssh, unit["path"]
    assert "nix" in unit["path"]
    assert all(drv.startswith(STORE) and drv.endswith(".drv") for drv in unit["pathDrvs"])
    assert r["configFileDrv"].startswith(STORE)
    # An IPv6 scrape target is bracketed.
    host = r["scrapeTarget"].rsplit(":", 1)[0]
    assert ":" not in host or (host.startswith("[") and host.endswith("]")), host
    # The rendered settings are a config the daemon accepts (what check-config does at build).
    parse_config(settings, "<nixos module>")


def expect_assertion(fragment: str) -> Callable[[Result], None]:
    """A check that the case evaluates and fails exactly one assertion containing fragment."""

    def check(r: Result) -> None:
        messages = r["failedAssertions"]
        assert len(messages) == 1 and fragment in messages[0], messages

    return check


# --- per case ---------------------------------------------------------------------------------


def check_minimal(r: Result) -> None:
    unit, config = r["unit"], r["unit"]["serviceConfig"]
    assert config["Type"] == "notify" and config["WatchdogSec"] == "60s"
    assert re.fullmatch(
        rf"{STORE}\S+/bin/hydra-cachix-bridge run --config {STORE}\S+-hydra-cachix-bridge\.toml",
        config["ExecStart"],
    ), config["ExecStart"]
    assert config["StateDirectory"] == "hydra-cachix-bridge"
    assert config["ReadWritePaths"] == [SPOOL]
    assert config["LoadCredential"] == []
    assert config["ProtectSystem"] == "strict" and config["TimeoutStopSec"] == "90s"
    assert unit["path"] == ["nix", "cachix"]
    # Resource bounds; no MemoryDenyWriteExecute with cachix (GHC adjustors need PROT_EXEC).
    assert (config["LimitNOFILE"], config["TasksMax"], config["MemoryMax"]) == (16384, 4096, "8G")
    assert config["MemoryDenyWriteExecute"] is False
    assert unit["environment"]["HOME"] == "/var/lib/hydra-cachix-bridge"
    assert r["users"]["hydra-cachix-bridge"] == {
        "isSystemUser": True,
        "isNormalUser": False,
        "group": GROUP,
        "extraGroups": [],
        "uid": None,
        "home": "/var/lib/hydra-cachix-bridge",
    }
    # A dedicated producers' group, not Hydra's `hydra`.
    assert r["groups"] == [GROUP]
    assert config["Group"] == GROUP
    # The spool root and the hook directory are root's (the root-run hook writes there);
    # the producers' directories are the daemon's and the group's, sticky.
    assert r["tmpfiles"] == [
        f"d {SPOOL} 0755 root root - -",
        *[
            f"d {SPOOL}{sub} 3770 hydra-cachix-bridge {GROUP} - -"
            for sub in ("/incoming", "/tmp", "/quarantine")
        ],
        f"d {SPOOL}/hook 2750 root {GROUP} 7d -",
    ]
    # No `rules` key: every event goes to every cache (an empty list would route nothing).
    assert "rules" not in r["settings"]
    assert len(parse_config(r["settings"], "<nixos module>").rules) == 1
    assert r["hydraExtraConfig"] is None and r["hydraDevExtraConfig"] is None
    assert r["nixSettings"] == {} and r["firewallTCP"] == []
    assert r["prometheus"] == {"ruleFiles": [], "scrapeConfigs": []}
    assert r["grafanaProviders"] == [] and r["systemPackages"] == ["hydra-cachix-bridge"]


def check_disabled(r: Result) -> None:
    assert r["unit"] is None and r["users"] == {} and r["tmpfiles"] == []
    assert r["failedAssertions"] == [] and r["systemPackages"] == []


def check_file_cache(r: Result) -> None:
    config = r["unit"]["serviceConfig"]
    assert config["ReadWritePaths"] == [SPOOL, "/var/cache/nix-mirror"]
    assert f"d /var/cache/nix-mirror 0750 hydra-cachix-bridge {GROUP} - -" in r["tmpfiles"]
    assert r["unit"]["path"] == ["nix", "cachix"]


def check_two_local_stores(r: Result) -> None:
    assert r["unit"]["serviceConfig"]["ReadWritePaths"] == [
        SPOOL,
        "/srv/cache-a",
        "/srv/chroot-store",
    ]


def check_state_dir_outside_var_lib(r: Result) -> None:
    config = r["unit"]["serviceConfig"]
    assert "StateDirectory" not in config
    assert "/srv/hcb/state" in config["ReadWritePaths"]
    assert f"d /srv/hcb/state 0700 hydra-cachix-bridge {GROUP} - -" in r["tmpfiles"]
    assert r["unit"]["environment"]["HOME"] == "/srv/hcb/state"
    assert r["users"]["hydra-cachix-bridge"]["home"] == "/srv/hcb/state"


def check_state_dir_under_var_lib(r: Result) -> None:
    config = r["unit"]["serviceConfig"]
    assert config["StateDirectory"] == "hcb-custom"
    assert config["ReadWritePaths"] == [SPOOL]


def check_spool_dir_changed(r: Result) -> None:
    assert r["unit"]["serviceConfig"]["ReadWritePaths"] == ["/srv/hcb-spool"]
    assert f"d /srv/hcb-spool/incoming 3770 hydra-cachix-bridge {GROUP} - -" in r["tmpfiles"]
    assert "d /srv/hcb-spool 0755 root root - -" in r["tmpfiles"]
    assert f"d /srv/hcb-spool/hook 2750 root {GROUP} 7d -" in r["tmpfiles"]


def check_secrets(r: Result) -> None:
    assert r["unit"]["serviceConfig"]["LoadCredential"] == [
        "main-token:/run/secrets/cachix-token",
        "main-signing-key:/run/secrets/cachix-signing-key",
    ]
    assert r["settings"]["caches"]["main"] == {
        "backend": "cachix",
        "auth_token_file": "main-token",
        "signing_key_file": "main-signing-key",
    }


def check_rejected(r: Result) -> None:
    assert r is None


def check_hydra_nixpkgs(r: Result) -> None:
    extra = r["hydraExtraConfig"]
    assert r["hydraModule"] == "hydra" and r["hydraDevExtraConfig"] is None
    assert re.fullmatch(
        r"<runcommand>\n  job = proj:main:\*\n"
        rf"  command = {STORE}\S+/bin/hydra-cachix-bridge enqueue-hydra --config "
        rf"{STORE}\S+-hydra-cachix-bridge\.toml\n</runcommand>\n",
        extra,
    ), extra
    assert r["unit"]["serviceConfig"]["ExecStart"].split("--config ")[1] in extra
    # Hydra's module keeps its users as it defined them; RunCommand's user joins the
    # producers' group (and nobody else of Hydra's does).
    assert r["users"]["hydra-queue-runner"]["uid"] == 236
    assert r["users"]["hydra-queue-runner"]["extraGroups"] == [GROUP]
    assert r["users"]["hydra-www"]["extraGroups"] == []
    assert r["users"]["hydra-cachix-bridge"]["group"] == GROUP
    assert set(r["users"]) == {"hydra", "hydra-queue-runner", "hydra-www", "hydra-cachix-bridge"}


def check_hydra_flake(r: Result) -> None:
    assert r["hydraModule"] == "hydra-dev" and r["hydraExtraConfig"] is None
    extra = r["hydraDevExtraConfig"]
    assert "using_frontend_proxy = 1" in extra and "<runcommand>\n  job = *:*:*\n" in extra
    assert r["users"]["hydra-queue-runner"]["isSystemUser"]


def check_hydra_both_imported_flake_enabled(r: Result) -> None:
    assert r["hydraModule"] == "hydra-dev"
    assert "<runcommand>" in r["hydraDevExtraConfig"]
    assert r["hydraExtraConfig"] == ""


def check_hydra_custom_group(r: Result) -> None:
    assert r["users"]["hydra-queue-runner"]["extraGroups"] == ["cachix-push"]
    assert r["users"]["hydra-queue-runner"]["group"] == "hydra"
    assert r["users"]["hydra-cachix-bridge"]["group"] == "cachix-push"
    assert "cachix-push" in r["groups"] and "hydra" in r["groups"]
    assert r["unit"]["serviceConfig"]["Group"] == "cachix-push"


def check_hook_retention(r: Result) -> None:
    """A hook directory of its own, kept 30 days; hook_dir reaches the daemon's config."""
    assert "d /srv/hcb-hook 2750 root hydra-cachix-bridge-producers 30d -" in r["tmpfiles"]
    assert r["settings"]["spool"]["hook_dir"] == "/srv/hcb-hook/"
    assert parse_config(r["settings"], "<nixos module>").hook_dir == Path("/srv/hcb-hook")


def check_custom_user(r: Result) -> None:
    assert "hydra-cachix-bridge" not in r["users"]
    assert r["users"]["pusher"]["home"] == "/home/pusher"
    assert r["unit"]["serviceConfig"]["User"] == "pusher"


def check_ssh_cache(r: Result) -> None:
    assert r["unit"]["path"] == ["nix", "cachix", "openssh"]


def check_nix_copy_only(r: Result) -> None:
    assert r["unit"]["path"] == ["nix"]
    # Without cachix nothing needs writable-then-executable memory.
    assert r["unit"]["serviceConfig"]["MemoryDenyWriteExecute"] is True


def scrape(target: str) -> Callable[[Result], None]:
    def check(r: Result) -> None:
        assert r["scrapeTarget"] == target
        assert r["prometheus"]["scrapeConfigs"] == [
            {"job_name": "hydra-cachix-bridge", "static_configs": [{"targets": [target]}]}
        ]
        (rules,) = r["prometheus"]["ruleFiles"]
        assert re.fullmatch(
            rf"{STORE}\S+/share/hydra-cachix-bridge/grafana/prometheus/"
            r"hydra-cachix-bridge\.rules\.yaml",
            rules,
        )

    return check


def check_firewall(r: Result) -> None:
    assert r["firewallTCP"] == [10198]


def check_grafana(r: Result) -> None:
    (provider,) = r["grafanaProviders"]
    assert provider["name"] == "hydra-cachix-bridge"
    assert re.fullmatch(
        rf"{STORE}\S+/share/hydra-cachix-bridge/grafana/dashboards", provider["options"]["path"]
    )


def check_grafana_alerts(r: Result) -> None:
    """The Grafana-managed rules, with the data source uid set once for grafana.service."""
    assert re.fullmatch(
        rf"{STORE}\S+/share/hydra-cachix-bridge/grafana/provisioning/alerting/"
        r"hydra-cachix-bridge\.yaml",
        r["grafanaAlertRules"],
    )
    assert r["grafanaEnvironment"] == {"HYDRA_CACHIX_BRIDGE_PROMETHEUS_DS_UID": "P1809F7CD0C75ACF3"}
    assert r["grafanaProviders"] == []


def check_post_build_hook(r: Result) -> None:
    hook = r["nixSettings"]["post-build-hook"]
    assert re.fullmatch(rf"{STORE}[0-9a-z]{{32}}-hydra-cachix-bridge-post-build-hook", hook)


def check_fractional_grace(r: Result) -> None:
    assert r["unit"]["serviceConfig"]["TimeoutStopSec"] == "73s"


def check_extra_read_write_paths(r: Result) -> None:
    assert r["unit"]["serviceConfig"]["ReadWritePaths"] == [SPOOL, "/extra"]


def check_rules_given(r: Result) -> None:
    assert r["settings"]["rules"] == [{"jobs": ["proj:main:*"], "caches": ["main"]}]


def check_vm_test_machine(r: Result) -> None:
    """nixos/tests/hydra-cachix-bridge.nix: its machine evaluates, its script renders."""
    assert r["unit"]["serviceConfig"]["ReadWritePaths"] == [SPOOL, "/var/cache/nix-mirror"]
    assert r["nixSettings"]["post-build-hook"].startswith(STORE)
    config_file = r["unit"]["serviceConfig"]["ExecStart"].split("--config ")[1]
    script = r["vmTestScript"]
    assert f'config = "{config_file}"' in script
    compile(script, "vm-test-script", "exec")


def check_hydra_database(r: Result) -> None:
    """hydraDatabase.enable: a peer-authenticated role, read-only grants, the dsn."""
    assert r["postgresqlUsers"] == [{"name": "hydra-cachix-bridge"}]
    assert r["settings"]["hydra_db"] == {
        "dsn": "dbname=hydra host=/run/postgresql user=hydra-cachix-bridge"
    }
    grants = r["grantsUnit"]
    assert grants["User"] == "postgres"
    assert "hydra-init.service" in grants["after"]
    assert grants["before"] == ["hydra-cachix-bridge.service"]
    sql = grants["sql"]
    assert (
        "GRANT SELECT ON builds, jobsets, buildoutputs, jobsetevals, jobsetevalmembers"
        ' TO "hydra-cachix-bridge"' in sql
    )
    assert "default_transaction_read_only = on" in sql
    # Nothing else is granted: no write privilege on Hydra's database.
    assert not re.search(r"\b(INSERT|UPDATE|DELETE|TRUNCATE|ALL)\b", sql)
    assert "hydra-cachix-bridge-hydra-grants.service" in r["unit"]["after"]
    assert "hydra-cachix-bridge-hydra-grants.service" in r["unit"]["wants"]


def check_hydra_database_remote_dsn(r: Result) -> None:
    """A dsn set by hand needs no local PostgreSQL, and nothing is created for it."""
    assert r["settings"]["hydra_db"]["dsn"] == "host=db.example.org dbname=hydra user=bridge"
    assert r["postgresqlUsers"] == []
    assert r["grantsUnit"] is None


HYDRA_MISSING = "services.hydra is not\nenabled"
CHECKS: dict[str, Callable[[Result], None]] = {
    "minimal": check_minimal,
    "disabled": check_disabled,
    "file-cache": check_file_cache,
    "two-local-stores": check_two_local_stores,
    "state-dir-outside-var-lib": check_state_dir_outside_var_lib,
    "state-dir-under-var-lib": check_state_dir_under_var_lib,
    "spool-dir-changed": check_spool_dir_changed,
    "secrets": check_secrets,
    "secret-path-literal": check_rejected,
    "secret-in-store": check_rejected,
    "secret-relative": check_rejected,
    "secret-unknown-cache": expect_assertion("names a cache that settings.caches does not"),
    "token-for-nix-copy": expect_assertion('only for caches with backend "cachix"'),
    "no-caches": expect_assertion("must define at least one cache"),
    "rules-given": check_rules_given,
    "hydra-nixpkgs": check_hydra_nixpkgs,
    "hydra-flake": check_hydra_flake,
    "hydra-both-imported-flake-enabled": check_hydra_both_imported_flake_enabled,
    "hydra-missing": expect_assertion(HYDRA_MISSING),
    "hydra-disabled": expect_assertion(HYDRA_MISSING),
    "hydra-module-mismatch": expect_assertion(HYDRA_MISSING),
    "hydra-custom-group": check_hydra_custom_group,
    "custom-user": check_custom_user,
    "hook-retention": check_hook_retention,
    "hook-dir-inside-state": expect_assertion("lies inside state_dir"),
    "ssh-ng-cache": check_ssh_cache,
    "ssh-cache": check_ssh_cache,
    "nix-copy-only": check_nix_copy_only,
    "prometheus-ipv4": scrape("127.0.0.1:10198"),
    "prometheus-ipv6": scrape("[::1]:9999"),
    "prometheus-ipv6-wildcard": scrape("[::1]:10198"),
    "prometheus-ipv4-wildcard": scrape("127.0.0.1:10198"),
    "metrics-disabled-with-rules": expect_assertion("need settings.metrics.enabled"),
    "firewall": check_firewall,
    "grafana": check_grafana,
    "grafana-alerts": check_grafana_alerts,
    "post-build-hook": check_post_build_hook,
    "misspelt-option": check_rejected,
    "wrong-type": check_rejected,
    "fractional-grace": check_fractional_grace,
    "extra-read-write-paths": check_extra_read_write_paths,
    "vm-test-machine": check_vm_test_machine,
    "hydra-database": check_hydra_database,
    "hydra-database-remote-dsn": check_hydra_database_remote_dsn,
    "hydra-database-without-postgresql": expect_assertion("needs Hydra's PostgreSQL"),
}


def run_check(name: str, outcome: dict[str, Any]) -> None:
    """A case's own check, plus the invariants when it evaluated to a clean configuration."""
    result = outcome["result"]
    CHECKS[name](result)
    if result is not None and result["unit"] is not None and not result["failedAssertions"]:
        check_invariants(result)


def test_every_case_has_a_check(evaluated: dict[str, Any]) -> None:
    assert set(evaluated["cases"]) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_case(evaluated: dict[str, Any], name: str) -> None:
    run_check(name, evaluated["cases"][name])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("secret-path-literal", r"authTokenFile.*not of type.*not in the Nix store"),
        ("secret-in-store", r"authTokenFile.*not of type.*not in the Nix store"),
        ("misspelt-option", r"services\.hydra-cachix-bridge\.setings.* does not exist"),
    ],
)
def test_rejected_case_names_the_option(case: str, message: str) -> None:
    done = evaluate(NIXOS, only=case, catch=False)
    assert done.returncode != 0
    assert re.search(message, " ".join(done.stderr.split())), done.stderr


def test_module_defaults_equal_the_daemons_defaults(evaluated: dict[str, Any]) -> None:
    """Every scalar default the daemon's settings declare has the same value in the module."""
    settings = evaluated["cases"]["minimal"]["result"]["settings"]
    expected = {
        key: value
        for key, value in declared_defaults(Config).items()
        if isinstance(value, bool | int | float | str)
    }
    assert len(expected) >= 15, expected
    for key, value in expected.items():
        section, _, name = key.rpartition(".")
        table = settings[section] if section else settings
        assert name in table, f"the module does not declare {key}"
        assert table[name] == MODULE_ONLY_DEFAULTS.get(key, value), key


def test_package_nix_evaluates(evaluated: dict[str, Any]) -> None:
    version = nix_version()
    if version < (2, 14):
        pytest.skip(
            f"Nix {'.'.join(map(str, version))} is older than 2.14, which current nixpkgs lib "
            "needs for lib.fileset (package.nix's source); run under Nix >= 2.14"
        )
    package = evaluated["package"]
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert package["name"] == f"hydra-cachix-bridge-{project['version']}"
    assert package["mainProgram"] == "hydra-cachix-bridge"
    assert package["drvPath"].startswith(STORE)
    assert sorted(package["src"]) == [
        "README.md",
        "bridge",
        "contrib",
        "exporter",
        "grafana",
        "pyproject.toml",
    ]


BREAKAGES = {
    # file:// caches no longer writable
    "no-file-cache-paths": (
        "module.nix",
        "++ lib.optional (!stateUnderVarLib) stateDir ++ fileCacheDirs;",
        "++ lib.optional (!stateUnderVarLib) stateDir;",
        "file-cache",
    ),
    # a path literal secret accepted and copied into the store
    "secret-as-types.path": (
        "module.nix",
        "  secretPath =\n",
        "  secretPath = types.path;\n  unusedSecretPath =\n",
        "secret-path-literal",
    ),
    # the <runcommand> always written to services.hydra
    "runcommand-to-services.hydra-only": (
        "integrations/hydra.nix",
        "extraConfig = mkIf (cfg.hydra.module == name) runcommand;",
        'extraConfig = mkIf (name == "hydra") runcommand;',
        "hydra-flake",
    ),
    # IPv6 target without brackets
    "no-brackets": (
        "integrations/prometheus.nix",
        '"[${scrapeHost}]"',
        "scrapeHost",
        "prometheus-ipv6",
    ),
    # ssh not on the path
    "no-ssh": (
        "module.nix",
        "++ lib.optional usesSsh pkgs.openssh;",
        ";",
        "ssh-ng-cache",
    ),
    # our user without isSystemUser
    "user-not-system": ("module.nix", "isSystemUser = true;", "", "minimal"),
    # state_dir outside /var/lib left read-only
    "state-dir-read-only": (
        "module.nix",
        "ReadWritePaths = [ spool ] ++ lib.optional (!stateUnderVarLib) stateDir",
        "ReadWritePaths = [ spool ]",
        "state-dir-outside-var-lib",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_module_fails_the_checks(
    evaluated: dict[str, Any], tmp_path: Path, breakage: str
) -> None:
    """Each check can fail: a copy of the module with one known bug fails its case."""
    file, old, new, case = BREAKAGES[breakage]
    broken = tmp_path / "nixos"
    shutil.copytree(NIXOS, broken)
    text = (broken / file).read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {file}: update the breakage"
    (broken / file).write_text(text.replace(old, new))
    outcome = evaluate_cases(broken, only=case)[case]
    with pytest.raises(AssertionError):
        run_check(case, outcome)
    # The same case passes on the real module (so the breakage, not the case, is at fault).
    run_check(case, evaluated["cases"][case])


def unit_file(unit: Result) -> str:
    """The [Service] section NixOS would write for the evaluated serviceConfig."""
    lines = ["[Unit]", "Description=hydra-cachix-bridge", "", "[Service]"]
    for key, value in unit["serviceConfig"].items():
        for item in value if isinstance(value, list) else [value]:
            text = ("yes" if item else "no") if isinstance(item, bool) else str(item)
            lines.append(f"{key}={text}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("case", ["minimal", "file-cache"])
def test_module_unit_exposure_is_at_most_2_5(
    evaluated: dict[str, Any], tmp_path: Path, case: str
) -> None:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze missing"
    path = tmp_path / "hydra-cachix-bridge.service"
    path.write_text(unit_file(evaluated["cases"][case]["result"]["unit"]))
    done = subprocess.run(
        [binary, "security", "--offline=yes", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.5, done.stdout
