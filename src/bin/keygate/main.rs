//! `keygate`: manage the keys of a keygate key store from the command line.
//!
//! ```sh
//! keygate --store keys.toml keys create --id ci --scope 'items:read'   # prints the key, once
//! keygate --store postgres://db/app migrate
//! keygate --store postgres://db/app keys rotate ci --grace 24h
//! keygate --store redis://cache --prefix keys keys list --json
//! echo -n "$KEY" | keygate digest
//! ```
//!
//! Keys are never taken as arguments (they would stay in shell history): `digest` reads one on
//! stdin. A key is printed only by `create` and `rotate`, once.
//!
//! Exit codes: 0 done; 1 the store failed (unreachable, not migrated); 2 a usage error; 3 no key
//! with that id; 4 the id or secret already exists.

mod output;
mod store;

use clap::{Args, Parser, Subcommand};
use keygate::limit::RateLimit;
use keygate::store::StoreError;
use keygate::{KeyDigest, KeyFacts, Scope};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

#[derive(Parser)]
#[command(name = "keygate", version, about = "Manage API keys in a keygate key store.")]
struct Cli {
    /// The store: a TOML key file's path, `redis://…`/`rediss://…`, or `postgres://…`.
    #[arg(long, env = "KEYGATE_STORE", global = true)]
    store: Option<String>,
    /// The PostgreSQL schema the keys are in.
    #[arg(long, default_value = "keygate", global = true)]
    schema: String,
    /// The Redis key prefix the keys are under.
    #[arg(long, default_value = "keygate", global = true)]
    prefix: String,
    /// Machine-readable output (one JSON document).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Prints the digest (`sha256:…`) of a key read on stdin: what stores and key files hold.
    Digest,
    /// Creates or updates the PostgreSQL store's tables (run once per release, before the app).
    Migrate,
}

#[derive(Subcommand)]
enum Keys {
    /// Creates a key and prints it, once: the store keeps only its digest.
    Create(Create),
    /// Lists keys: ids, names, scopes, status, expiry, customer. Never secrets.
    List {
        /// Only this customer's keys.
        #[arg(long)]
        customer: Option<String>,
    },
    /// Shows one key.
    Show { id: String },
    /// Disables a key (it is refused until enabled).
    Disable { id: String },
    /// Enables a disabled key.
    Enable { id: String },
    /// Deletes a key for good.
    Delete { id: String },
    /// Gives a key a new secret and prints it, once. The old one keeps working for `--grace`.
    Rotate {
        id: String,
        /// How long the old secret keeps working: `0`, `90s`, `30m`, `24h`, `7d`.
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        grace: Duration,
    },
    /// Adds the keys of a TOML key file (digests, or development keys) to the store.
    Import { file: std::path::PathBuf },
}

#[derive(Args)]
struct Create {
    /// The key's id, unique in the store.
    #[arg(long)]
    id: String,
    /// A human name.
    #[arg(long)]
    name: Option<String>,
    /// A scope, such as `items:read,create` or `admin:*` (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The customer (identity) the key belongs to.
    #[arg(long)]
    customer: Option<String>,
    /// How long until the key expires: `30d`, `12h`.
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<Duration>,
    /// The key's own rate limit: `100/min`, `10/s`, `1000/3600s`.
    #[arg(long)]
    rate_limit: Option<String>,
    /// The key's usage allowance, in total.
    #[arg(long)]
    usage_limit: Option<u64>,
    /// A metadata entry, `name=value` (repeatable).
    #[arg(long = "metadata", value_parser = parse_pair)]
    metadata: Vec<(String, String)>,
}

/// A failure, with the exit code it means.
struct Failure(u8, String);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::NotFound(_) => 3,
            StoreError::Exists(_) => 4,
            // What was asked cannot be done as asked (a grace window too long, a schema name).
            StoreError::Invalid(_) => 2,
            _ => 1,
        };
        Self(code, e.to_string())
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure(2, message.into())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let unreadable = || format!("{text:?}: a number and a unit (ms, s, m, h, d)");
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| unreadable())?;
    let per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" if n == 0 => 0,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(unreadable()),
    };
    n.checked_mul(per_unit).map(Duration::from_secs).ok_or_else(|| format!("{text:?} is too long"))
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("{text:?}: name=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&Failure(1, format!("tokio runtime: {e}")), cli.json),
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => fail(&failure, cli.json),
    }
}

fn fail(failure: &Failure, json: bool) -> ExitCode {
    if json {
        eprintln!("{}", serde_json::json!({ "error": failure.1, "exit_code": failure.0 }));
    } else {
        eprintln!("keygate: {}", failure.1);
    }
    ExitCode::from(failure.0)
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    if let Command::Digest = cli.command {
        return digest(cli.json).await;
    }
    let location = cli.store.as_deref().ok_or_else(|| usage("no store: give --store or set KEYGATE_STORE"))?;
    let opened = store::open(location, &cli.schema, &cli.prefix).await?;
    let out = output::Output { json: cli.json };
    match &cli.command {
        Command::Digest => unreachable!("handled above"),
        Command::Migrate => {
            opened.migrate().await?;
            out.done("migrated", None);
            Ok(())
        }
        Command::Keys(keys) => run_keys(keys, &opened, out).await,
    }
}

/// Runs a `keys` command. Each change is saved (to a key file) before it is reported, so a key is
/// never shown that was not kept.
async fn run_keys(command: &Keys, opened: &store::Opened, out: output::Output) -> Result<(), Failure> {
    let admin = opened.admin();
    match command {
        Keys::Create(create) => {
            let created = admin.create(facts(create)?).await?;
            opened.save().await?;
            out.key_shown_once(&created.facts.id, created.key.expose_secret(), None);
        }
        Keys::List { customer } => out.list(&admin.store().list(customer.as_deref()).await?),
        Keys::Show { id } => {
            let (digest, key) =
                admin.store().find(id).await?.ok_or_else(|| Failure(3, format!("no key with id {id:?}")))?;
            out.show(&digest, &key);
        }
        Keys::Disable { id } => {
            admin.disable(id).await?;
            opened.save().await?;
            out.done("disabled", Some(id));
        }
        Keys::Enable { id } => {
            admin.enable(id).await?;
            opened.save().await?;
            out.done("enabled", Some(id));
        }
        Keys::Delete { id } => {
            admin.delete(id).await?;
            opened.save().await?;
            out.done("deleted", Some(id));
        }
        Keys::Rotate { id, grace } => {
            let key = admin.rotate(id, *grace).await?;
            opened.save().await?;
            let until = (!grace.is_zero()).then(|| SystemTime::now() + *grace);
            out.key_shown_once(id, key.expose_secret(), until);
        }
        Keys::Import { file } => {
            let file = keygate::store::KeyFile::read(file).map_err(|e| usage(e.to_string()))?;
            let count = file.keys.len();
            for (digest, key) in file.keys {
                admin.store().insert(digest, key).await?;
            }
            opened.save().await?;
            out.done(&format!("imported {count} keys"), None);
        }
    }
    Ok(())
}

fn facts(c: &Create) -> Result<KeyFacts, Failure> {
    let scopes = c.scopes.iter().map(|s| s.parse::<Scope>()).collect::<Result<Vec<_>, _>>();
    let mut facts = KeyFacts::new(&c.id).with_scopes(scopes.map_err(|e| usage(e.to_string()))?);
    if c.id.is_empty() {
        return Err(usage("--id must not be empty"));
    }
    if let Some(name) = &c.name {
        facts = facts.with_name(name);
    }
    if let Some(customer) = &c.customer {
        facts = facts.with_customer(customer);
    }
    if let Some(after) = c.expires_in {
        let at = SystemTime::now().checked_add(after).ok_or_else(|| usage("--expires-in is too long"))?;
        facts = facts.with_expiry(at);
    }
    if let Some(limit) = &c.rate_limit {
        facts = facts.with_rate_limit(RateLimit::parse("key", limit).map_err(|e| usage(e.to_string()))?);
    }
    if let Some(limit) = c.usage_limit {
        facts = facts.with_usage_limit(limit);
    }
    for (k, v) in &c.metadata {
        facts = facts.with_metadata(k, v);
    }
    Ok(facts)
}

/// Reads one key from stdin (a trailing newline is not part of it) and prints its digest.
async fn digest(json: bool) -> Result<(), Failure> {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    tokio::io::stdin().read_to_string(&mut text).await.map_err(|e| Failure(1, format!("stdin: {e}")))?;
    let key = text.strip_suffix('\n').map(|k| k.strip_suffix('\r').unwrap_or(k)).unwrap_or(&text);
    if key.is_empty() || key.contains('\n') {
        return Err(usage("give exactly one key on stdin"));
    }
    let digest = KeyDigest::of(key);
    if json {
        println!("{}", serde_json::json!({ "digest": digest.to_string() }));
    } else {
        println!("{digest}");
    }
    Ok(())
}
