//! The dependency graph keeps the promises `docs/security.md` makes.
//!
//! - aws-lc-rs is the only crypto library compiled in: `ring` is in
//!   `Cargo.lock` only because the lock file lists optional dependencies of
//!   every feature (rustls-webpki's `ring` feature), and no crate of the
//!   workspace, for any target, may turn it on.
//! - One major of `pem`, the one kube and rcgen use.

use std::process::Command;

/// `cargo tree` over the whole workspace with `args`, as text.
fn cargo_tree(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--workspace",
            "--locked",
            "--offline",
            "--target",
            "all",
        ])
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo tree prints UTF-8")
}

#[test]
fn ring_is_in_the_lock_file_but_compiled_into_nothing() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("Cargo.lock");
    // If this starts failing because ring left the lock file, drop the
    // paragraph in docs/security.md that explains why it is there.
    assert!(
        lock.contains("name = \"ring\""),
        "ring is no longer in Cargo.lock"
    );
    let users = cargo_tree(&["-e", "normal,build,dev", "-i", "ring"]);
    assert!(
        users.trim().is_empty(),
        "a crate of the workspace compiles ring in:\n{users}"
    );
    // The check above is worth something only if the same query finds a
    // crypto library that is compiled in.
    let aws = cargo_tree(&["-e", "normal", "-i", "aws-lc-rs", "--depth", "0"]);
    assert!(aws.contains("aws-lc-rs"), "aws-lc-rs not found:\n{aws}");
}

#[test]
fn one_major_of_pem() {
    let tree = cargo_tree(&[
        "-e",
        "normal,build,dev",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    let mut versions: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.strip_prefix("pem v"))
        .map(|rest| rest.split([' ', '.']).next().unwrap_or(rest))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions, ["4"], "pem majors in the build");
}
