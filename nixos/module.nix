# NixOS module: services.hydra-cachix-bridge
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkMerge
    mkOption
    types
    ;

  cfg = config.services.hydra-cachix-bridge;
  settingsFormat = pkgs.formats.toml { };
  share = "${cfg.package}/share/hydra-cachix-bridge";

  # Secret files never enter the store: systemd copies them into $CREDENTIALS_DIRECTORY and
  # the config refers to them by these relative credential names.
  credentialName = cache: kind: "${cache}-${kind}";
  credentials = lib.concatLists (
    lib.mapAttrsToList (
      name: secret:
      lib.optional (secret.authTokenFile != null) "${credentialName name "token"}:${secret.authTokenFile}"
      ++ lib.optional (
        secret.signingKeyFile != null
      ) "${credentialName name "signing-key"}:${secret.signingKeyFile}"
    ) cfg.cachix
  );
  secretSettings = {
    caches = lib.mapAttrs (
      name: secret:
      lib.optionalAttrs (secret.authTokenFile != null) {
        auth_token_file = credentialName name "token";
      }
      // lib.optionalAttrs (secret.signingKeyFile != null) {
        signing_key_file = credentialName name "signing-key";
      }
    ) cfg.cachix;
  };
  # TOML has no null: options left unset (null) are dropped.
  effectiveSettings = lib.filterAttrsRecursive (_: value: value != null) (
    lib.recursiveUpdate cfg.settings secretSettings
  );

  # Checked at build time: a config the daemon would reject fails the system build.
  configFile =
    pkgs.runCommand "hydra-cachix-bridge.toml"
      {
        nativeBuildInputs = [ cfg.package ];
        raw = settingsFormat.generate "hydra-cachix-bridge-unchecked.toml" effectiveSettings;
      }
      ''
        cp "$raw" "$out"
        CREDENTIALS_DIRECTORY=/nonexistent hydra-cachix-bridge check-config --config "$out" > /dev/null
      '';

  hook =
    pkgs.runCommand "hydra-cachix-bridge-post-build-hook" { nativeBuildInputs = [ cfg.package ]; }
      ''
        hydra-cachix-bridge hook-script --config ${configFile} \
          --tools-path ${lib.makeBinPath [ pkgs.coreutils pkgs.gnused ]} > "$out"
        chmod 755 "$out"
      '';

  spool = cfg.settings.spool_dir;
  usesCachix = lib.any (cache: (cache.backend or null) == "cachix") (
    lib.attrValues cfg.settings.caches
  );
in
{
  options.services.hydra-cachix-bridge = {
    enable = mkEnableOption "hydra-cachix-bridge, which pushes Hydra builds to Nix binary caches";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The hydra-cachix-bridge package.";
    };

    user = mkOption {
      type = types.str;
      default = "hydra-cachix-bridge";
      description = "Static user the daemon runs as.";
    };

    group = mkOption {
      type = types.str;
      default = "hydra";
      description = ''
        Group shared by the daemon, Hydra's RunCommand (hydra-queue-runner) and the
        post-build-hook (root): it may write the spool.
      '';
    };

    settings = mkOption {
      description = ''
        Configuration, rendered to TOML (see the README's configuration reference). Do not
        put secrets here: the Nix store is world-readable; use `cachix.<name>.*File`.
      '';
      default = { };
      example = lib.literalExpression ''
        {
          caches.mycache.backend = "cachix";
          caches.mirror = { backend = "nix-copy"; uri = "s3://nix-mirror?region=eu-west-1"; };
          rules = [
            { jobs = [ "myproject:main:*" ]; caches = [ "mycache" ]; }
            { sources = [ "hook" ]; caches = [ "mirror" ]; }
          ];
        }
      '';
      type = types.submodule {
        freeformType = settingsFormat.type;
        options = {
          state_dir = mkOption {
            type = types.str;
            default = "/var/lib/hydra-cachix-bridge";
            description = "SQLite queue and lock; managed by systemd's StateDirectory.";
          };
          spool_dir = mkOption {
            type = types.str;
            default = "/var/spool/hydra-cachix-bridge";
            description = "Where producers drop event files.";
          };
          log_level = mkOption {
            type = types.enum [
              "debug"
              "info"
              "warning"
              "error"
            ];
            default = "info";
            description = "Log level.";
          };
          push = mkOption {
            default = { };
            description = "Batching, timeouts and retries.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                workers = mkOption {
                  type = types.ints.positive;
                  default = 4;
                  description = "Pushes running at once over all caches.";
                };
                batch_size = mkOption {
                  type = types.ints.positive;
                  default = 32;
                  description = "Paths per push invocation.";
                };
                timeout_seconds = mkOption {
                  type = types.ints.positive;
                  default = 1800;
                  description = "Per invocation; the process group is killed after it.";
                };
                max_attempts = mkOption {
                  type = types.ints.positive;
                  default = 8;
                  description = "Failures (the last one alone in its batch) before a path is dead-lettered.";
                };
                shutdown_grace_seconds = mkOption {
                  type = types.ints.unsigned;
                  default = 30;
                  description = "How long running pushes may finish on stop.";
                };
              };
            };
          };
          spool = mkOption {
            default = { };
            description = "Spool settings.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options.group_writable = mkOption {
                type = types.bool;
                default = true;
                description = "Spool writable by the group (needed for RunCommand and the hook).";
              };
            };
          };
          metrics = mkOption {
            default = { };
            description = "Prometheus endpoint.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                listen_address = mkOption {
                  type = types.str;
                  default = "127.0.0.1";
                  description = "Address for /metrics and /healthz.";
                };
                port = mkOption {
                  type = types.port;
                  default = 10198;
                  description = "Port for /metrics and /healthz.";
                };
              };
            };
          };
          caches = mkOption {
            default = { };
            description = "Destination caches; the attribute name is the Cachix cache name.";
            type = types.attrsOf (
              types.submodule {
                freeformType = settingsFormat.type;
                options = {
                  backend = mkOption {
                    type = types.enum [
                      "cachix"
                      "nix-copy"
                    ];
                    description = "How to push.";
                  };
                  uri = mkOption {
                    type = types.nullOr types.str;
                    default = null;
                    description = "Nix store URI, for backend nix-copy.";
                  };
                };
              }
            );
          };
          rules = mkOption {
            type = types.listOf settingsFormat.type;
            default = [ ];
            description = "Which events go to which caches; none means everything goes everywhere.";
          };
        };
      };
    };

    cachix = mkOption {
      default = { };
      description = ''
        Secret files per cache (by cache name), handed to the service with
        LoadCredential= and never copied into the store.
      '';
      type = types.attrsOf (
        types.submodule {
          options = {
            authTokenFile = mkOption {
              type = types.nullOr types.path;
              default = null;
              description = "File with the Cachix auth token (CACHIX_AUTH_TOKEN).";
            };
            signingKeyFile = mkOption {
              type = types.nullOr types.path;
              default = null;
              description = "File with the cache's signing key (CACHIX_SIGNING_KEY, or nix-copy's secret-key).";
            };
          };
        }
      );
    };

    hydra = {
      enable = mkEnableOption "a Hydra <runcommand> that records every finished build";
      jobs = mkOption {
        type = types.str;
        default = "*:*:*";
        description = "Hydra job pattern (project:jobset:job) of the <runcommand> block.";
      };
    };

    postBuildHook.enable = mkEnableOption "the bridge's sh post-build-hook in nix.settings";

    metrics.openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the metrics port in the firewall.";
    };

    grafana.provisionDashboards = mkOption {
      type = types.bool;
      default = false;
      description = "Provision the bundled dashboard into services.grafana.";
    };

    prometheus.rules = mkOption {
      type = types.bool;
      default = false;
      description = "Add the bundled alert rules and a scrape job to services.prometheus.";
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.settings.caches != { };
          message = "services.hydra-cachix-bridge.settings.caches must define at least one cache.";
        }
        {
          assertion = lib.all (name: cfg.settings.caches ? ${name}) (lib.attrNames cfg.cachix);
          message = "services.hydra-cachix-bridge.cachix names a cache that settings.caches does not define.";
        }
      ];

      users.users.${cfg.user} = {
        isSystemUser = true;
        inherit (cfg) group;
        home = cfg.settings.state_dir;
        description = "hydra-cachix-bridge daemon";
      };
      users.groups.${cfg.group} = { };

      systemd.tmpfiles.rules = map (dir: "d ${dir} 3770 ${cfg.user} ${cfg.group} - -") [
        spool
        "${spool}/incoming"
        "${spool}/tmp"
        "${spool}/quarantine"
      ];

      systemd.services.hydra-cachix-bridge = {
        description = "hydra-cachix-bridge: push Hydra builds to Nix binary caches";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [
          "network-online.target"
          "nix-daemon.socket"
        ];
        path = [ config.nix.package ] ++ lib.optional usesCachix pkgs.cachix;
        environment.HOME = cfg.settings.state_dir;
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${lib.getExe cfg.package} run --config ${configFile}";
          Restart = "on-failure";
          RestartSec = "5s";
          WatchdogSec = "60s";
          TimeoutStopSec = "${toString (cfg.settings.push.shutdown_grace_seconds + 60)}s";
          User = cfg.user;
          Group = cfg.group;
          UMask = "0027";
          StateDirectory = "hydra-cachix-bridge";
          StateDirectoryMode = "0700";
          ReadWritePaths = [ spool ];
          LoadCredential = credentials;

          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          DevicePolicy = "closed";
          PrivateUsers = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectClock = true;
          ProtectHostname = true;
          ProtectProc = "invisible";
          ProcSubset = "pid";
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          RemoveIPC = true;
          LockPersonality = true;
          MemoryDenyWriteExecute = true;
          SystemCallArchitectures = "native";
          SystemCallFilter = [
            "@system-service"
            "~@privileged @resources"
          ];
          SystemCallErrorNumber = "EPERM";
          # AF_UNIX: nix-daemon socket and sd_notify; AF_INET(6): caches and /metrics.
          RestrictAddressFamilies = [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
          ];
        };
      };

      environment.systemPackages = [ cfg.package ];
    }

    (mkIf cfg.hydra.enable {
      users.users.hydra-queue-runner.extraGroups = lib.optional (cfg.group != "hydra") cfg.group;
      services.hydra.extraConfig = ''
        <runcommand>
          job = ${cfg.hydra.jobs}
          command = ${lib.getExe cfg.package} enqueue-hydra --config ${configFile}
        </runcommand>
      '';
    })

    (mkIf cfg.postBuildHook.enable {
      nix.settings.post-build-hook = "${hook}";
    })

    (mkIf cfg.metrics.openFirewall {
      networking.firewall.allowedTCPPorts = [ cfg.settings.metrics.port ];
    })

    (mkIf cfg.grafana.provisionDashboards {
      services.grafana.provision.dashboards.settings.providers = [
        {
          name = "hydra-cachix-bridge";
          folder = "Nix";
          options.path = "${share}/grafana/dashboards";
        }
      ];
    })

    (mkIf cfg.prometheus.rules {
      services.prometheus.ruleFiles = [ "${share}/grafana/prometheus/hydra-cachix-bridge.rules.yaml" ];
      services.prometheus.scrapeConfigs = [
        {
          job_name = "hydra-cachix-bridge";
          static_configs = [
            {
              targets = [ "${cfg.settings.metrics.listen_address}:${toString cfg.settings.metrics.port}" ];
            }
          ];
        }
      ];
    })
  ]);
}
