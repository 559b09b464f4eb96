# Stand-in for nixpkgs' Hydra module (nixos/modules/services/continuous-integration/hydra):
# the options the bridge touches and the users and group it defines (fixed uids from ids.nix).
{ config, lib, ... }:
{
  options.services.hydra = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = false;
    };
    extraConfig = lib.mkOption {
      type = lib.types.lines;
      default = "";
    };
  };
  config = lib.mkIf config.services.hydra.enable {
    users.groups.hydra.gid = 209;
    users.users.hydra = {
      uid = 235;
      group = "hydra";
      home = "/var/lib/hydra";
      createHome = true;
      useDefaultShell = true;
    };
    users.users.hydra-queue-runner = {
      uid = 236;
      group = "hydra";
      home = "/var/lib/hydra/queue-runner";
      useDefaultShell = true;
    };
    users.users.hydra-www = {
      uid = 237;
      group = "hydra";
      home = "/var/lib/hydra/www";
      useDefaultShell = true;
    };
  };
}
