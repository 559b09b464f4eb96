# NixOS VM test (needs KVM): nix-build -A vmTest, or nix flake check.
# A machine with the module: a derivation built with the post-build-hook, a Hydra
# RunCommand payload enqueued as Hydra's user, both pushed to a file:// cache (which the
# module creates and makes writable under ProtectSystem=strict), metrics scraped.
# tests/test_nixos_module.py evaluates the module without a VM.
{
  name = "hydra-cachix-bridge";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ ../module.nix ];
      virtualisation.memorySize = 1024;
      nix.settings.substituters = [ ];
      # RunCommand runs as hydra-queue-runner; stand in for it without a whole Hydra.
      users.users.hydra-queue-runner = {
        isSystemUser = true;
        group = "hydra";
        extraGroups = [ "hydra-cachix-bridge-producers" ];
      };
      users.groups.hydra = { };
      services.hydra-cachix-bridge = {
        enable = true;
        postBuildHook.enable = true;
        settings = {
          caches.local = {
            backend = "nix-copy";
            uri = "file:///var/cache/nix-mirror";
          };
          push.batch_size = 8;
        };
      };
      environment.systemPackages = [ pkgs.curl ];
    };

  testScript =
    { nodes, ... }:
    ''
    import json

    config = "${nodes.machine.services.hydra-cachix-bridge.configFile}"
    machine.wait_for_unit("hydra-cachix-bridge.service")
    # The file:// cache directory: made by the module's tmpfiles rule, writable in the unit.
    machine.succeed("test -d /var/cache/nix-mirror")
    machine.succeed(
        "systemctl show -P ReadWritePaths hydra-cachix-bridge | grep -q /var/cache/nix-mirror"
    )
    machine.wait_until_succeeds("curl -sf http://127.0.0.1:10198/healthz")
    # Root owns the spool root and the hook's directory; the producers' group writes the rest.
    machine.succeed("test \"$(stat -c %U:%a /var/spool/hydra-cachix-bridge)\" = root:755")
    machine.succeed(
        "test \"$(stat -c %U:%G:%a /var/spool/hydra-cachix-bridge/hook)\" = "
        "root:hydra-cachix-bridge-producers:2750"
    )

    # A local build runs the post-build-hook, which drops an event into the spool.
    machine.succeed(
        "echo 'derivation { name = \"vmtest\"; system = builtins.currentSystem; "
        "builder = \"/bin/sh\"; args = [ \"-c\" \"echo hi > $out\" ]; }' > /tmp/t.nix"
    )
    out = machine.succeed("nix-build /tmp/t.nix --no-out-link").strip()
    drv = machine.succeed(f"nix-store --query --deriver {out}").strip()
    h = out.split("/")[-1].split("-")[0]
    machine.wait_until_succeeds(f"test -f /var/cache/nix-mirror/{h}.narinfo", timeout=60)

    # A RunCommand payload, recorded as Hydra's user would.
    machine.succeed(
        "echo 'derivation { name = \"vmtest2\"; system = builtins.currentSystem; "
        "builder = \"/bin/sh\"; args = [ \"-c\" \"echo ho > $out\" ]; }' > /tmp/t2.nix"
    )
    out2 = machine.succeed("nix-build /tmp/t2.nix --no-out-link").strip()
    drv2 = machine.succeed(f"nix-store --query --deriver {out2}").strip()
    payload = {
        "event": "buildFinished", "build": 1, "finished": True, "timestamp": 0,
        "startTime": 0, "stopTime": 1, "project": "p", "jobset": "j", "job": "vm",
        "drvPath": drv2, "buildStatus": 0, "nixName": "vmtest2", "system": "x86_64-linux",
        "homepage": None, "description": None, "license": None,
        "outputs": [{"name": "out", "path": out2}], "products": [], "metrics": [],
    }
    machine.succeed(f"echo '{json.dumps(payload)}' > /tmp/payload.json && chmod 644 /tmp/payload.json")
    machine.succeed(
        f"su -s /bin/sh hydra-queue-runner -c "
        f"'HYDRA_JSON=/tmp/payload.json hydra-cachix-bridge enqueue-hydra --config {config}'"
    )
    h2 = out2.split("/")[-1].split("-")[0]
    machine.wait_until_succeeds(f"test -f /var/cache/nix-mirror/{h2}.narinfo", timeout=60)

    metrics = machine.succeed("curl -sf http://127.0.0.1:10198/metrics")
    assert 'hydra_cachix_bridge_paths_pushed_total{cache="local"} 2.0' in metrics, metrics
    assert 'hydra_cachix_bridge_events_received_total{source="hydra"} 1.0' in metrics
    status = json.loads(machine.succeed(f"hydra-cachix-bridge status --json --config {config}"))
    assert status["daemon_running"]

    # A clean stop within the grace period.
    machine.succeed("systemctl stop hydra-cachix-bridge")
    machine.succeed("journalctl -u hydra-cachix-bridge | grep -q 'stopped'")
  '';
}
