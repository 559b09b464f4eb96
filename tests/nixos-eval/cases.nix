# One NixOS configuration per case (a list of modules added to the module under test and
# the option stubs). tests/test_nixos_module.py holds what each case must produce.
{ lib }:

let
  # Every case starts from an enabled bridge with one Cachix cache and the stub package.
  base =
    { pkgs, ... }:
    {
      services.hydra-cachix-bridge = {
        enable = lib.mkDefault true;
        package = pkgs.hydra-cachix-bridge;
        settings.caches.main.backend = "cachix";
      };
    };
  with' = settings: [
    base
    { services.hydra-cachix-bridge = settings; }
  ];
  hydraNixpkgs = ./hydra-nixpkgs.nix;
  hydraFlake = ./hydra-flake.nix;
  onlyCaches = caches: {
    settings.caches = lib.mkForce caches;
  };
in
{
  minimal = [ base ];

  disabled = with' { enable = false; };

  file-cache = with' {
    settings.caches.mirror = {
      backend = "nix-copy";
      uri = "file:///var/cache/nix-mirror?compression=zstd&secret-key=x";
    };
  };

  two-local-stores = with' {
    settings.caches.a = {
      backend = "nix-copy";
      uri = "file:///srv/cache-a/";
    };
    settings.caches.b = {
      backend = "nix-copy";
      uri = "/srv/chroot-store";
    };
    settings.caches.s3 = {
      backend = "nix-copy";
      uri = "s3://bucket?region=eu-west-1";
    };
  };

  state-dir-outside-var-lib = with' { settings.state_dir = "/srv/hcb/state"; };

  state-dir-under-var-lib = with' { settings.state_dir = "/var/lib/hcb-custom"; };

  spool-dir-changed = with' { settings.spool_dir = "/srv/hcb-spool/"; };

  secrets = with' {
    cachix.main = {
      authTokenFile = "/run/secrets/cachix-token";
      signingKeyFile = "/run/secrets/cachix-signing-key";
    };
  };

  secret-path-literal = with' { cachix.main.authTokenFile = ./not-a-secret.token; };

  secret-in-store = with' {
    cachix.main.authTokenFile = "${builtins.storeDir}/00000000000000000000000000000000-token";
  };

  secret-relative = with' { cachix.main.authTokenFile = "cachix-token"; };

  secret-unknown-cache = with' { cachix.other.authTokenFile = "/run/secrets/other"; };

  no-caches = with' (onlyCaches { });

  token-for-nix-copy = with' {
    settings.caches.mirror = {
      backend = "nix-copy";
      uri = "s3://bucket";
    };
    cachix.mirror.authTokenFile = "/run/secrets/token";
  };

  rules-given = with' {
    settings.rules = [
      {
        jobs = [ "proj:main:*" ];
        caches = [ "main" ];
      }
    ];
  };

  hydra-nixpkgs = with' { hydra.enable = true; hydra.jobs = "proj:main:*"; } ++ [
    hydraNixpkgs
    { services.hydra.enable = true; }
  ];

  hydra-flake = with' { hydra.enable = true; } ++ [
    hydraFlake
    { services.hydra-dev.enable = true; }
  ];

  hydra-both-imported-flake-enabled = with' { hydra.enable = true; } ++ [
    hydraNixpkgs
    hydraFlake
    { services.hydra-dev.enable = true; }
  ];

  hydra-missing = with' { hydra.enable = true; };

  hydra-disabled = with' { hydra.enable = true; } ++ [ hydraNixpkgs ];

  hydra-module-mismatch =
    with' {
      hydra.enable = true;
      hydra.module = "hydra";
    }
    ++ [
      hydraFlake
      { services.hydra-dev.enable = true; }
    ];

  hydra-custom-group =
    with' {
      hydra.enable = true;
      group = "cachix-push";
    }
    ++ [
      hydraNixpkgs
      { services.hydra.enable = true; }
    ];

  hook-retention = with' {
    hookRetention = "30d";
    settings.spool.hook_dir = "/srv/hcb-hook/";
  };

  hook-dir-inside-state = with' { settings.spool_dir = "/var/lib/hydra-cachix-bridge/spool"; };

  custom-user = with' { user = "pusher"; } ++ [
    {
      users.users.pusher = {
        isSystemUser = true;
        group = "hydra-cachix-bridge-producers";
        home = "/home/pusher";
      };
    }
  ];

  ssh-ng-cache = with' {
    settings.caches.remote = {
      backend = "nix-copy";
      uri = "ssh-ng://nix-ssh@cache.example.org";
    };
  };

  ssh-cache = with' {
    settings.caches.remote = {
      backend = "nix-copy";
      uri = "ssh://cache.example.org";
    };
  };

  nix-copy-only = with' (onlyCaches {
    mirror = {
      backend = "nix-copy";
      uri = "s3://bucket";
    };
  });

  prometheus-ipv4 = with' { prometheus.rules = true; };

  prometheus-ipv6 = with' {
    prometheus.rules = true;
    settings.metrics = {
      listen_address = "::1";
      port = 9999;
    };
  };

  prometheus-ipv6-wildcard = with' {
    prometheus.rules = true;
    settings.metrics.listen_address = "::";
  };

  prometheus-ipv4-wildcard = with' {
    prometheus.rules = true;
    settings.metrics.listen_address = "0.0.0.0";
  };

  metrics-disabled-with-rules = with' {
    prometheus.rules = true;
    settings.metrics.enabled = false;
  };

  firewall = with' { metrics.openFirewall = true; };

  grafana = with' { grafana.provisionDashboards = true; };

  grafana-alerts = with' {
    grafana.provisionAlerts = true;
    grafana.prometheusDatasourceUid = "P1809F7CD0C75ACF3";
  };

  post-build-hook = with' { postBuildHook.enable = true; };

  misspelt-option = with' { setings.log_level = "debug"; };

  wrong-type = with' { settings.push.workers = 0; };

  fractional-grace = with' { settings.push.shutdown_grace_seconds = 12.5; };

  extra-read-write-paths = with' { } ++ [
    { systemd.services.hydra-cachix-bridge.serviceConfig.ReadWritePaths = [ "/extra" ]; }
  ];

  hydra-database = (with' { hydraDatabase.enable = true; }) ++ [
    { services.postgresql.enable = true; }
  ];

  hydra-database-remote-dsn = with' {
    settings.hydra_db.dsn = "host=db.example.org dbname=hydra user=bridge";
  };

  hydra-database-without-postgresql = with' { hydraDatabase.enable = true; };
}
