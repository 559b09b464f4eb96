# NixOS module: services.hydra-cachix-bridge
# This file holds the daemon (package, settings, secrets, user, spool, service); each
# integration lives in its own file under ./integrations/.
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
    mkOption
    types
    ;

  cfg = config.services.hydra-cachix-bridge;
  settingsFormat = pkgs.formats.toml { };

  # A secret is a runtime path outside the store. A path literal (`./token`) would be copied
  # into the world-readable store when interpolated, so it is rejected.
  secretPath =
    if types ? externalPath then
      types.externalPath
    else if types ? pathWith then
      types.pathWith {
        inStore = false;
        absolute = true;
      }
    else
      types.addCheck types.str (
        p: lib.hasPrefix "/" p && !lib.hasPrefix "${builtins.storeDir}/" p
      )
      // {
        description = "absolute path not in the Nix store";
      };

  # Numbers with the bounds the daemon's config reader enforces (bridge/config.py).
  atLeast =
    min:
    types.addCheck types.number (x: x >= min)
    // {
      description = "number at least ${toString min}";
    };
  setting =
    type: default: description:
    mkOption { inherit type default description; };

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
        # --offline: the file only; secrets, executables and directories exist on the host.
        hydra-cachix-bridge check-config --offline --config "$out" > /dev/null
      '';

  trimSlash = dir: if dir != "/" then lib.removeSuffix "/" dir else dir;
  spool = trimSlash cfg.settings.spool_dir;
  stateDir = trimSlash cfg.settings.state_dir;
  # The post-build-hook's own directory: root's, read by the daemon through the group.
  hookDir =
    if cfg.settings.spool.hook_dir != null then
      trimSlash cfg.settings.spool.hook_dir
    else
      "${spool}/hook";
  # systemd creates and owns /var/lib/<name> through StateDirectory=; elsewhere tmpfiles does.
  stateUnderVarLib = lib.hasPrefix "/var/lib/" stateDir;

  cacheUris = lib.filter (uri: uri != null) (
    lib.mapAttrsToList (_: cache: cache.uri or null) cfg.settings.caches
  );
  # `nix copy --to file:///dir` (or a local store given as an absolute path) writes /dir
  # from inside the unit, which ProtectSystem=strict makes read-only unless listed.
  localStoreDir =
    uri:
    let
      location = lib.head (lib.splitString "?" uri);
    in
    if lib.hasPrefix "file://" location then
      trimSlash (lib.removePrefix "file://" location)
    else if lib.hasPrefix "/" location then
      trimSlash location
    else
      null;
  fileCacheDirs = lib.unique (lib.filter (dir: dir != null) (map localStoreDir cacheUris));
  usesSsh = lib.any (uri: lib.hasPrefix "ssh://" uri || lib.hasPrefix "ssh-ng://" uri) cacheUris;
  cachixCaches = lib.filterAttrs (_: cache: (cache.backend or null) == "cachix") cfg.settings.caches;
  usesCachix = cachixCaches != { };
in
{
  imports = [
    ./integrations/hydra.nix
    ./integrations/post-build-hook.nix
    ./integrations/prometheus.nix
    ./integrations/grafana.nix
    ./integrations/hydra-database.nix
  ];

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
      description = ''
        User the daemon runs as. Left at the default, the module creates it as a system user
        in `group`; otherwise you make sure the user exists.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "hydra-cachix-bridge-producers";
      description = ''
        The producers' group: only the daemon and Hydra's RunCommand user
        (hydra-queue-runner, added by `hydra.enable`) belong to it. Its members may write
        event files into the spool; they are not trusted beyond that (hook events count
        only from the root-owned hook directory). Not Hydra's `hydra` group, which also
        holds the web frontend and the evaluator.
      '';
    };

    hookRetention = mkOption {
      type = types.strMatching "[0-9]+(us|ms|s|m|min|h|d|w)?";
      default = "7d";
      example = "30d";
      description = ''
        How long systemd-tmpfiles keeps the hook's event files (the tmpfiles age of the
        root-owned hook directory; the daemon cannot delete there). A file the daemon has
        not read by then is lost with the build's event: keep it well above the longest
        time the daemon may be down.
      '';
    };

    configFile = mkOption {
      type = types.package;
      readOnly = true;
      default = configFile;
      defaultText = lib.literalMD "the checked TOML file rendered from `settings`";
      description = ''
        The rendered and checked config file, e.g. for
        `hydra-cachix-bridge status --config`.
      '';
    };

    settings = mkOption {
      description = ''
        Configuration, rendered to TOML (see the README's configuration reference). Do not
        put secrets here: the Nix store is world-readable; use `cachix.<name>.*File`.
        The defaults below are the daemon's own, except `spool.group_writable`.
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
            description = ''
              SQLite queue and lock. Under /var/lib it is the unit's StateDirectory=;
              elsewhere tmpfiles creates it and the unit may write it.
            '';
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
          log_poll_seconds = setting (atLeast 0.05) 1.0 "How often log sources are polled.";
          retention_days = setting (atLeast 0) 14.0 "How long finished queue entries are kept.";
          push = mkOption {
            default = { };
            description = "Batching, timeouts and retries.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                workers = setting types.ints.positive 4 "Pushes running at once over all caches.";
                batch_size = setting types.ints.positive 32 "Paths per push invocation.";
                timeout_seconds = setting (atLeast 1) 1800.0 "Per invocation; the process group is killed after it.";
                max_attempts =
                  setting types.ints.positive 8
                    "Failures (the last one alone in its batch) before a path is dead-lettered.";
                backoff_initial_seconds = setting (atLeast 0) 5.0 "First retry delay.";
                backoff_max_seconds = setting (atLeast 0) 900.0 "Longest retry delay.";
                shutdown_grace_seconds = setting (atLeast 0) 30.0 "How long running pushes may finish on stop.";
              };
            };
          };
          spool = mkOption {
            default = { };
            description = "Spool settings.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                group_writable = mkOption {
                  type = types.bool;
                  # The daemon's default is false; RunCommand and the hook need it here.
                  default = true;
                  description = "Spool writable by the group (needed for RunCommand and the hook).";
                };
                max_event_bytes = setting (types.ints.between 256 (
                  1024 * 1024 * 1024
                )) (1024 * 1024) "Larger event files are quarantined.";
                rescan_seconds = setting (atLeast 0.1) 30.0 "Periodic rescan of the spool.";
                hook_dir = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  description = ''
                    The post-build-hook's directory (default: `<spool_dir>/hook`). Every
                    directory above it must be root's and not writable by others.
                  '';
                };
              };
            };
          };
          metrics = mkOption {
            default = { };
            description = "Prometheus endpoint.";
            type = types.submodule {
              freeformType = settingsFormat.type;
              options = {
                enabled = setting types.bool true "Serve /metrics and /healthz.";
                listen_address = setting types.str "127.0.0.1" "Address for /metrics and /healthz (IPv4 or IPv6).";
                port = setting types.port 10198 "Port for /metrics and /healthz.";
                per_jobset = setting types.bool false "Label push metrics with project and jobset.";
                per_jobset_limit = setting types.ints.positive 200 "Distinct project/jobset label pairs; the rest are counted as (other).";
              };
            };
          };
          caches = mkOption {
            default = { };
            description = ''
              Destination caches; the attribute name is the Cachix cache name. A `file://`
              cache directory is created (mode 0750, the daemon's user and group) and made
              writable for the unit; `ssh://` and `ssh-ng://` caches put `ssh` on its PATH.
            '';
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
            # null leaves `rules` out of the file: every event goes to every cache. An empty
            # list would be rendered and would route nothing.
            type = types.nullOr (types.listOf settingsFormat.type);
            default = null;
            description = "Which events go to which caches; unset means everything goes everywhere.";
          };
        };
      };
    };

    cachix = mkOption {
      default = { };
      description = ''
        Secret files per cache (by cache name), handed to the service with
        LoadCredential= and never copied into the store: give them as strings
        (`"/run/secrets/cachix-token"`), not path literals.
      '';
      type = types.attrsOf (
        types.submodule {
          options = {
            authTokenFile = mkOption {
              type = types.nullOr secretPath;
              default = null;
              description = "File with the Cachix auth token (CACHIX_AUTH_TOKEN).";
            };
            signingKeyFile = mkOption {
              type = types.nullOr secretPath;
              default = null;
              description = "File with the cache's signing key (CACHIX_SIGNING_KEY, or nix-copy's secret-key).";
            };
          };
        }
      );
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(lib.hasPrefix "${stateDir}/" "${hookDir}/");
        message = ''
          services.hydra-cachix-bridge: the hook directory ${hookDir} lies inside state_dir
          ${stateDir}, which the daemon's user owns: it could redirect the root-run
          post-build-hook. Put settings.spool_dir (or settings.spool.hook_dir) elsewhere.
        '';
      }
      {
        assertion = cfg.settings.caches != { };
        message = "services.hydra-cachix-bridge.settings.caches must define at least one cache.";
      }
      {
        assertion = lib.all (name: cfg.settings.caches ? ${name}) (lib.attrNames cfg.cachix);
        message = "services.hydra-cachix-bridge.cachix names a cache that settings.caches does not define.";
      }
      {
        assertion = lib.all (
          name:
          cfg.cachix.${name}.authTokenFile == null
          || !(cfg.settings.caches ? ${name})
          || cachixCaches ? ${name}
        ) (lib.attrNames cfg.cachix);
        message = "services.hydra-cachix-bridge.cachix.<name>.authTokenFile is only for caches with backend \"cachix\".";
      }
    ];

    # Only the default user is ours to define; Hydra's module owns group hydra's gid.
    users.users = mkIf (cfg.user == "hydra-cachix-bridge") {
      ${cfg.user} = {
        isSystemUser = true;
        inherit (cfg) group;
        home = stateDir;
        description = "hydra-cachix-bridge daemon";
      };
    };
    users.groups.${cfg.group} = { };

    # The spool root and the hook directory are root's, so that no producer and not the
    # daemon can rename or replace what the root-run hook writes into; the producers'
    # directories are the daemon's and the group's (setgid, sticky). tmpfiles ages the
    # hook's files out (the daemon only reads them) and fixes modes of existing ones.
    systemd.tmpfiles.rules = [
      "d ${spool} 0755 root root - -"
    ]
    ++ map (dir: "d ${dir} 3770 ${cfg.user} ${cfg.group} - -") [
      "${spool}/incoming"
      "${spool}/tmp"
      "${spool}/quarantine"
    ]
    ++ [ "d ${hookDir} 2750 root ${cfg.group} ${cfg.hookRetention} -" ]
      ++ lib.optional (!stateUnderVarLib) "d ${stateDir} 0700 ${cfg.user} ${cfg.group} - -"
      ++ map (dir: "d ${dir} 0750 ${cfg.user} ${cfg.group} - -") fileCacheDirs;

    systemd.services.hydra-cachix-bridge = {
      description = "hydra-cachix-bridge: push Hydra builds to Nix binary caches";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      path = [
        config.nix.package
      ]
      ++ lib.optional usesCachix pkgs.cachix
      ++ lib.optional usesSsh pkgs.openssh;
      environment.HOME = stateDir;
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${lib.getExe cfg.package} run --config ${configFile}";
        Restart = "on-failure";
        RestartSec = "5s";
        WatchdogSec = "60s";
        TimeoutStopSec = "${toString (builtins.ceil (cfg.settings.push.shutdown_grace_seconds + 60))}s";
        User = cfg.user;
        Group = cfg.group;
        UMask = "0027";
        # The spool, a state_dir outside /var/lib and every file:// cache directory: all
        # else is read-only under ProtectSystem=strict.
        ReadWritePaths = [ spool ] ++ lib.optional (!stateUnderVarLib) stateDir ++ fileCacheDirs;
        LoadCredential = credentials;

        # Resource bounds (see contrib/systemd/hydra-cachix-bridge.service for the why).
        LimitNOFILE = lib.mkDefault 16384;
        TasksMax = lib.mkDefault 4096;
        MemoryMax = lib.mkDefault "8G";

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
        # cachix is a GHC program: its runtime makes FFI callback code (adjustors) by
        # mprotect()ing a written page PROT_READ|PROT_EXEC, which this setting forbids
        # (docs/deployment.md). Kept where only nix-copy caches run.
        MemoryDenyWriteExecute = !usesCachix;
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
      }
      // lib.optionalAttrs stateUnderVarLib {
        StateDirectory = lib.removePrefix "/var/lib/" stateDir;
        StateDirectoryMode = "0700";
      };
    };

    environment.systemPackages = [ cfg.package ];
  };
}
