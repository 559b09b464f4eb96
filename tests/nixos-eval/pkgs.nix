# Stub `pkgs`: every package is a real derivation that cannot build (its builder fails), so
# forcing `.drvPath` checks every interpolation without nixpkgs. `formats.toml` uses the
# same lib types as nixpkgs' pkgs-lib/formats.nix; its generate refuses nulls, which
# remarshal's json2toml would reject at build time.
{ lib }:

let
  system = builtins.currentSystem;

  mkDerivation =
    attrs:
    derivation (
      {
        inherit system;
        builder = "/bin/false";
      }
      // attrs
    );

  package =
    name:
    mkDerivation { inherit name; }
    // {
      pname = name;
      meta.mainProgram = name;
    };

  runCommand =
    name: env: script:
    mkDerivation (
      env
      // {
        inherit name;
        buildCommand = script;
      }
    );

  callPackage =
    fn: args:
    let
      f = if lib.isFunction fn then fn else import fn;
    in
    f (builtins.intersectAttrs (lib.functionArgs f) pkgs // args);

  nullsIn =
    at: value:
    if value == null then
      [ at ]
    else if lib.isAttrs value then
      lib.concatLists (lib.mapAttrsToList (k: v: nullsIn "${at}.${k}" v) value)
    else if lib.isList value then
      lib.concatLists (lib.imap0 (i: v: nullsIn "${at}[${toString i}]" v) value)
    else
      [ ];

  toml =
    { }:
    {
      type =
        let
          valueType =
            lib.types.oneOf [
              lib.types.bool
              lib.types.int
              lib.types.float
              lib.types.str
              lib.types.path
              (lib.types.attrsOf valueType)
              (lib.types.listOf valueType)
            ]
            // {
              description = "TOML value";
            };
        in
        valueType;
      generate =
        name: value:
        let
          nulls = nullsIn "" value;
        in
        if nulls != [ ] then
          throw "formats.toml: TOML has no null (at ${lib.concatStringsSep ", " nulls})"
        else
          runCommand name {
            nativeBuildInputs = [ pkgs.remarshal ];
            value = builtins.toJSON value;
            passAsFile = [ "value" ];
            preferLocalBuild = true;
          } ''json2toml "$valuePath" "$out"'';
    };

  pythonPackage = name: package name;

  pkgs = {
    inherit lib runCommand callPackage;
    formats = { inherit toml; };
    nix = package "nix";
    cachix = package "cachix";
    openssh = package "openssh" // {
      meta.mainProgram = "ssh";
    };
    coreutils = package "coreutils";
    gnused = package "gnused";
    curl = package "curl";
    remarshal = package "remarshal";
    postgresql = package "postgresql";
    hydra-cachix-bridge = package "hydra-cachix-bridge";
    python3Packages = {
      setuptools = pythonPackage "setuptools";
      click = pythonPackage "click";
      prometheus-client = pythonPackage "prometheus-client";
      watchdog = pythonPackage "watchdog";
      psycopg = pythonPackage "psycopg";
      buildPythonApplication =
        attrs:
        mkDerivation {
          name = "${attrs.pname}-${attrs.version}";
          inherit (attrs) src postInstall;
          dependencies = attrs.dependencies ++ attrs.build-system;
        }
        // {
          inherit (attrs) pname version meta;
        };
    };
  };
in
pkgs
