-- A read-only PostgreSQL role for hydra-cachix-bridge's [hydra_db] source.
--
-- Run once as a superuser (or Hydra's database owner) in Hydra's database:
--   sudo -u postgres psql -d hydra -f hydra-cachix-bridge-role.sql
-- With peer authentication on the local socket (NixOS' default for Hydra), the system
-- user hydra-cachix-bridge then logs in as this role with no password:
--   [hydra_db]
--   dsn = "dbname=hydra host=/run/postgresql user=hydra-cachix-bridge"
-- Over TCP, set a password (\password hydra-cachix-bridge) and point password_file at it.
--
-- Idempotent: safe to run again after a Hydra upgrade.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'hydra-cachix-bridge') THEN
        CREATE ROLE "hydra-cachix-bridge" LOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO "hydra-cachix-bridge"', current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO "hydra-cachix-bridge";
-- Exactly what the bridge reads: finished builds, their jobset's names, their outputs,
-- and which builds belong to an evaluation (for `backfill --eval/--latest`).
GRANT SELECT ON builds, jobsets, buildoutputs, jobsetevals, jobsetevalmembers
    TO "hydra-cachix-bridge";
-- Belt and braces: the bridge also opens every session read-only.
ALTER ROLE "hydra-cachix-bridge" SET default_transaction_read_only = on;
