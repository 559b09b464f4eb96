# Stand-in for Hydra's own flake module (hydra's nixos-modules): services.hydra-dev, whose
# users are system users of group hydra.
{ config, lib, ... }:
{
  options.services.hydra-dev = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = false;
    };
    extraConfig = lib.mkOption { type = lib.types.lines; };
  };
  config = lib.mkIf config.services.hydra-dev.enable {
    services.hydra-dev.extraConfig = "using_frontend_proxy = 1";
    users.groups.hydra = { };
    users.users.hydra = {
      isSystemUser = true;
      group = "hydra";
      home = "/var/lib/hydra";
      useDefaultShell = true;
    };
    users.users.hydra-queue-runner = {
      isSystemUser = true;
      group = "hydra";
      home = "/var/lib/hydra/queue-runner";
      useDefaultShell = true;
    };
  };
}
