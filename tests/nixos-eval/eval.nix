# Evaluates nixos/module.nix (and package.nix) with the real nixpkgs lib, the option stubs
# and the stub pkgs, once per case in cases.nix, and returns what each case produced:
#   nix-instantiate --eval --strict --json tests/nixos-eval/eval.nix \
#     --argstr lib /path/to/nixpkgs/lib --argstr nixosDir /path/to/nixos
# Every case runs under tryEval, so one failing case is reported as {ok = false;} without
# hiding the others; `only` selects cases and `catch = false` lets an error through with
# its message.
{
  lib,
  nixosDir,
  only ? "",
  catch ? true,
  withPackage ? false,
}:

let
  nixpkgsLib = import (/. + lib);
  pkgs = import ./pkgs.nix { lib = nixpkgsLib; };
  dir = /. + nixosDir;
  inherit (nixpkgsLib)
    attrNames
    filter
    filterAttrs
    mapAttrs
    ;

  # The VM test's machine (nixos/tests/), with the stub package: its config must evaluate
  # and its test script must render against it.
  vmTest = import (dir + "/tests/hydra-cachix-bridge.nix");
  vmTestCase = [
    vmTest.nodes.machine
    (
      { lib, ... }:
      {
        options.virtualisation.memorySize = lib.mkOption { type = lib.types.int; };
        config.services.hydra-cachix-bridge.package = pkgs.hydra-cachix-bridge;
      }
    )
  ];
  cases = import ./cases.nix { lib = nixpkgsLib; } // {
    vm-test-machine = vmTestCase;
  };
  selected =
    if only == "" then
      cases
    else
      filterAttrs (name: _: builtins.elem name (nixpkgsLib.splitString "," only)) cases;

  evaluate =
    modules:
    nixpkgsLib.evalModules {
      modules = [
        ./nixos-options.nix
        (dir + "/module.nix")
      ]
      ++ modules;
      specialArgs = { inherit pkgs; };
    };

  nameOf = p: p.pname or p.name or p;

  summarize =
    eval:
    let
      c = eval.config;
      b = c.services.hydra-cachix-bridge;
      unit = c.systemd.services.hydra-cachix-bridge or null;
    in
    {
      failedAssertions = map (a: a.message) (filter (a: !a.assertion) c.assertions);
      unit =
        if unit == null then
          null
        else
          {
            inherit (unit)
              environment
              serviceConfig
              after
              wants
              wantedBy
              ;
            path = map nameOf unit.path;
            # Forces every package on the path to instantiate.
            pathDrvs = map (p: p.drvPath) unit.path;
            loadCredentialHasContext = map builtins.hasContext (unit.serviceConfig.LoadCredential or [ ]);
          };
      settings = if b.enable then builtins.fromJSON b.configFile.raw.value else null;
      configFileDrv = if b.enable then b.configFile.drvPath else null;
      users = mapAttrs (_: u: {
        inherit (u)
          isSystemUser
          isNormalUser
          group
          extraGroups
          uid
          home
          ;
      }) c.users.users;
      groups = attrNames c.users.groups;
      tmpfiles = c.systemd.tmpfiles.rules;
      hydraModule = b.hydra.module;
      hydraExtraConfig = c.services.hydra.extraConfig or null;
      hydraDevExtraConfig = c.services.hydra-dev.extraConfig or null;
      nixSettings = c.nix.settings;
      firewallTCP = c.networking.firewall.allowedTCPPorts;
      prometheus = {
        inherit (c.services.prometheus) ruleFiles scrapeConfigs;
      };
      scrapeTarget = b.prometheus.scrapeTarget;
      grafanaProviders = c.services.grafana.provision.dashboards.settings.providers;
      grafanaAlertRules = c.services.grafana.provision.alerting.rules.path;
      grafanaEnvironment = (c.systemd.services.grafana or { environment = { }; }).environment;
      postgresqlUsers = c.services.postgresql.ensureUsers;
      grantsUnit =
        let
          grants = c.systemd.services.hydra-cachix-bridge-hydra-grants or null;
        in
        if grants == null then
          null
        else
          {
            inherit (grants) after before requires;
            inherit (grants.serviceConfig) User ExecStart;
            sql = b.hydraDatabase.grantsSql;
          };
      systemPackages = map nameOf c.environment.systemPackages;
      vmTestScript = vmTest.testScript { nodes.machine = c; };
    };

  run =
    modules:
    let
      summary = summarize (evaluate modules);
      tried = builtins.tryEval (builtins.deepSeq summary summary);
    in
    if catch then
      {
        ok = tried.success;
        result = if tried.success then tried.value else null;
      }
    else
      {
        ok = true;
        result = builtins.deepSeq summary summary;
      };

  package =
    let
      drv = pkgs.callPackage (dir + "/package.nix") { };
    in
    {
      inherit (drv) name version drvPath;
      mainProgram = drv.meta.mainProgram;
      src = attrNames (builtins.readDir drv.src);
    };
in
{
  cases = mapAttrs (_: run) selected;
  package = if withPackage then package else null;
  nixVersion = builtins.nixVersion;
}
