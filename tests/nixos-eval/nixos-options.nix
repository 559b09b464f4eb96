# Loosely typed declarations of every NixOS option the module sets or reads, so that
# `_module.check` still rejects a misspelt one. Types are looser than NixOS's except where
# merging matters (systemd's list-valued directives concatenate, as in nixpkgs), and the
# users module's own assertions are repeated so an incomplete user fails as on NixOS.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  anyOpt = mkOption { type = types.anything; };

  # nixpkgs' systemd-unit-options.nix: list definitions concatenate, scalars must agree.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge =
      loc: defs:
      let
        defs' = lib.filterOverrides defs;
      in
      if lib.any (def: lib.isList def.value) defs' then
        lib.concatMap (def: lib.toList def.value) defs'
      else
        lib.mergeEqualOption loc defs';
  };

  service = types.submodule {
    options = {
      description = opt types.str "";
      wantedBy = opt (types.listOf types.str) [ ];
      wants = opt (types.listOf types.str) [ ];
      after = opt (types.listOf types.str) [ ];
      before = opt (types.listOf types.str) [ ];
      requires = opt (types.listOf types.str) [ ];
      path = opt (types.listOf (types.either types.package types.str)) [ ];
      environment = opt (types.attrsOf (types.nullOr types.str)) { };
      serviceConfig = opt (types.attrsOf unitOption) { };
    };
  };

  user = types.submodule (
    { name, ... }:
    {
      options = {
        name = opt types.str name;
        uid = opt (types.nullOr types.int) null;
        isSystemUser = opt types.bool false;
        isNormalUser = opt types.bool false;
        group = opt types.str "";
        extraGroups = opt (types.listOf types.str) [ ];
        description = opt types.str "";
        home = opt types.str "/var/empty";
        createHome = opt types.bool false;
        useDefaultShell = opt types.bool false;
      };
    }
  );
  group = types.submodule (
    { name, ... }:
    {
      options = {
        name = opt types.str name;
        gid = opt (types.nullOr types.int) null;
        members = opt (types.listOf types.str) [ ];
      };
    }
  );
in
{
  options = {
    assertions = opt (types.listOf types.unspecified) [ ];
    warnings = opt (types.listOf types.str) [ ];
    users.users = opt (types.attrsOf user) { };
    users.groups = opt (types.attrsOf group) { };
    systemd.services = opt (types.attrsOf service) { };
    systemd.tmpfiles.rules = opt (types.listOf types.str) [ ];
    environment.systemPackages = opt (types.listOf types.package) [ ];
    nix.package = opt types.package pkgs.nix;
    nix.settings = opt (types.attrsOf types.anything) { };
    networking.firewall.allowedTCPPorts = opt (types.listOf types.port) [ ];
    services.prometheus.ruleFiles = opt (types.listOf types.str) [ ];
    services.prometheus.scrapeConfigs = opt (types.listOf types.anything) [ ];
    services.grafana.provision.dashboards.settings.providers = opt (types.listOf types.anything) [ ];
    services.grafana.provision.alerting.rules.path = opt (types.nullOr types.str) null;
    services.postgresql.enable = opt types.bool false;
    services.postgresql.package = opt types.package pkgs.postgresql;
    services.postgresql.ensureUsers = opt (types.listOf types.anything) [ ];
  };

  # From nixpkgs' nixos/modules/config/users-groups.nix.
  config.assertions = lib.concatLists (
    lib.mapAttrsToList (name: u: [
      {
        assertion =
          let
            isEffectivelySystemUser = u.isSystemUser || (u.uid != null && u.uid < 1000 && !u.isNormalUser);
          in
          isEffectivelySystemUser != u.isNormalUser;
        message = "Exactly one of users.users.${name}.isSystemUser and users.users.${name}.isNormalUser must be set.";
      }
      {
        assertion = u.group != "";
        message = "users.users.${name}.group is unset.";
      }
    ]) config.users.users
  );
}
