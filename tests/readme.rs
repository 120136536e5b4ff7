//! What the README shows a user to copy is what the crate accepts.

use keygate::store::KeyFile;
use keygate::KeyDigest;

/// The fenced block of `lang` under the heading `heading`.
fn block(heading: &str, lang: &str) -> String {
    let readme = include_str!("../README.md");
    let section = readme.split(&format!("\n## {heading}\n")).nth(1).expect("the section exists");
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).expect("the section has the block") + fence.len();
    section[start..].split("\n```").next().unwrap().to_owned()
}

#[test]
fn the_key_file_example_loads_and_its_digest_is_the_keys() {
    let file = KeyFile::parse(&block("Key file", "toml")).unwrap();
    assert_eq!(file.keys.len(), 1);
    assert_eq!(file.keys[0].0, KeyDigest::of("dev-key-1"), "the digest shown is of the key named");
    assert_eq!(file.keys[0].1.facts.id, "key_ci");
}

/// Every metric keygate records is in the README's table, and the table names no other.
#[test]
fn the_metrics_table_lists_every_metric() {
    let readme = include_str!("../README.md");
    let section = readme.split("\n## Metrics (feature `metrics`)\n").nth(1).expect("the section exists");
    let table: Vec<&str> = section
        .split("\n## ")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("| `keygate_"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.ends_with("_total") || name.ends_with("_seconds") || name.ends_with("_units"))
        .collect();
    let mut listed: Vec<String> = table.iter().map(|name| format!("keygate_{name}")).collect();
    let mut recorded: Vec<String> = keygate::observe::ALL.iter().map(|n| n.to_string()).collect();
    listed.sort();
    recorded.sort();
    assert_eq!(listed, recorded);
}
