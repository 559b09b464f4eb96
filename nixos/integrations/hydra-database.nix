# NixOS module part: Hydra's PostgreSQL as the bridge's source.
#
#   services.hydra-cachix-bridge.hydraDatabase.enable = true;
#
# creates a login role for the daemon's user with services.postgresql.ensureUsers (peer
# authentication on the local socket: no password), grants it SELECT on the five tables
# the bridge reads once Hydra's schema exists (hydra-init.service), and sets
# settings.hydra_db.dsn. Imported by ../module.nix; reads services.hydra-cachix-bridge.{enable,
# user, settings} from it.
{
  config,
  lib,
  ...
}:

let
  inherit (lib)
    mkDefault
    mkEnableOption
    mkIf
    mkOption
    types
    ;

  cfg = config.services.hydra-cachix-bridge;
  dbCfg = cfg.hydraDatabase;
  role = dbCfg.role;
  psql = "${config.services.postgresql.package}/bin/psql";

  grantsSql = builtins.toFile "hydra-cachix-bridge-hydra-grants.sql" dbCfg.grantsSql;
  # Quoted identifiers in grantsSql: keep names to characters that need no escaping.
  safeName = name: builtins.match "[A-Za-z0-9_.-]+" name != null;
in
{
  _file = ./hydra-database.nix;

  options.services.hydra-cachix-bridge.hydraDatabase = {
    enable = mkEnableOption ''
      Hydra's PostgreSQL (on this host) as a source: the daemon LISTENs for build_finished
      and catches up by query, independently of hydra-notify. Creates a read-only role
      and sets settings.hydra_db.dsn'';

    database = mkOption {
      type = types.str;
      default = "hydra";
      description = "Hydra's database (services.hydra uses `hydra`).";
    };

    role = mkOption {
      type = types.str;
      default = cfg.user;
      defaultText = lib.literalExpression "config.services.hydra-cachix-bridge.user";
      description = ''
        PostgreSQL role the daemon logs in as. With peer authentication (the NixOS default
        on the local socket) it must equal the daemon's system user.
      '';
    };

    grantsSql = mkOption {
      type = types.lines;
      internal = true;
      readOnly = true;
      # The same statements as contrib/hydra-db/hydra-cachix-bridge-role.sql, for this role
      # and database. Idempotent: runs at every start of the grants unit.
      default = ''
        GRANT CONNECT ON DATABASE "${dbCfg.database}" TO "${role}";
        GRANT USAGE ON SCHEMA public TO "${role}";
        GRANT SELECT ON builds, jobsets, buildoutputs, jobsetevals, jobsetevalmembers TO "${role}";
        ALTER ROLE "${role}" SET default_transaction_read_only = on;
      '';
      description = "The SQL the grants unit runs as postgres (read-only; for tests and review).";
    };

    socketDirectory = mkOption {
      type = types.str;
      default = "/run/postgresql";
      description = "Directory of PostgreSQL's Unix socket.";
    };
  };

  config = mkIf (cfg.enable && dbCfg.enable) {
    assertions = [
      {
        assertion = config.services.postgresql.enable;
        message = ''
          services.hydra-cachix-bridge.hydraDatabase.enable needs Hydra's PostgreSQL on this
          host (services.postgresql.enable). For a remote database, leave it off and set
          services.hydra-cachix-bridge.settings.hydra_db.dsn (and password_file) yourself.
        '';
      }
      {
        assertion = safeName role && safeName dbCfg.database;
        message = "services.hydra-cachix-bridge.hydraDatabase: role and database must match [A-Za-z0-9_.-]+.";
      }
    ];

    services.postgresql.ensureUsers = [ { name = role; } ];

    systemd.services.hydra-cachix-bridge-hydra-grants = {
      description = "hydra-cachix-bridge: read-only grants on Hydra's database";
      requires = [ "postgresql.service" ];
      # hydra-init.service creates Hydra's tables; postgresql-setup.service (newer
      # nixpkgs) or postgresql.service's post-start (older) creates ensureUsers' roles.
      after = [
        "postgresql.service"
        "postgresql-setup.service"
        "hydra-init.service"
      ];
      wants = [ "hydra-init.service" ];
      before = [ "hydra-cachix-bridge.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        User = "postgres";
        ExecStart = "${psql} -v ON_ERROR_STOP=1 -d ${dbCfg.database} -f ${grantsSql}";
      };
    };

    systemd.services.hydra-cachix-bridge = {
      wants = [ "hydra-cachix-bridge-hydra-grants.service" ];
      after = [
        "postgresql.service"
        "hydra-cachix-bridge-hydra-grants.service"
      ];
    };

    services.hydra-cachix-bridge.settings.hydra_db.dsn = mkDefault "dbname=${dbCfg.database} host=${dbCfg.socketDirectory} user=${role}";
  };
}
