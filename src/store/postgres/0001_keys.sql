-- keygate's key store, version 1. `keygate` stands for the store's schema.
CREATE SCHEMA IF NOT EXISTS keygate;

-- One row per key: what it is (facts, as JSON) and whether it may be used.
CREATE TABLE keygate.keys (
    id          text PRIMARY KEY,
    facts       jsonb NOT NULL,
    customer_id text GENERATED ALWAYS AS (facts ->> 'customer_id') STORED,
    enabled     boolean NOT NULL DEFAULT true,
    deleted     boolean NOT NULL DEFAULT false,
    -- Bumped by every update (a trigger below), so that compare-and-set sees edits made in SQL.
    revision    bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX keys_customer ON keygate.keys (customer_id) WHERE customer_id IS NOT NULL;

-- The SHA-256 digests of a key's secrets: its current one (grace_ends NULL) and those rotated
-- away that still work until grace_ends. Never the secrets themselves.
CREATE TABLE keygate.digests (
    digest     bytea PRIMARY KEY CHECK (length(digest) = 32),
    id         text NOT NULL REFERENCES keygate.keys (id) ON DELETE CASCADE,
    grace_ends timestamptz
);
CREATE UNIQUE INDEX digests_current ON keygate.digests (id) WHERE grace_ends IS NULL;
CREATE INDEX digests_id ON keygate.digests (id);

CREATE FUNCTION keygate.bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := OLD.revision + 1;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER keys_bump_revision BEFORE UPDATE ON keygate.keys
    FOR EACH ROW EXECUTE FUNCTION keygate.bump_revision();

-- Revocations: every committed change to a key, or to one of its digests, is announced on the
-- channel `keygate:<schema>` as `sha256:<hex> <ms since the epoch>` for each digest it affects,
-- whoever made it (keygate, or an administrator in SQL). NOTIFY is sent at commit.
CREATE FUNCTION keygate.announce() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    channel text := 'keygate:' || TG_TABLE_SCHEMA;
    at text := (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text;
BEGIN
    IF TG_TABLE_NAME = 'keys' THEN
        PERFORM pg_notify(channel, 'sha256:' || encode(d.digest, 'hex') || ' ' || at)
            FROM keygate.digests d WHERE d.id = OLD.id;
    ELSE
        PERFORM pg_notify(channel, 'sha256:' || encode(OLD.digest, 'hex') || ' ' || at);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER keys_announce AFTER UPDATE OR DELETE ON keygate.keys
    FOR EACH ROW EXECUTE FUNCTION keygate.announce();
CREATE TRIGGER digests_announce AFTER UPDATE OR DELETE ON keygate.digests
    FOR EACH ROW EXECUTE FUNCTION keygate.announce();
