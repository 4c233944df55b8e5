//! `install` and `remove` with stand-in tools (symlinks to `true` and
//! `false`): what happens before and around the real iptables, without root.
//! The runs of the real tools in network namespaces need root and live in
//! `tests/tests/capture.rs`.

use std::{os::unix::fs::symlink, path::PathBuf};

use super::*;

/// A directory of stand-in tools: symlinks to `true`/`false`, so nothing is
/// written that a concurrently forked test could hold open (ETXTBSY).
fn fake_tools(tools: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, target) in tools {
        let target = ["/bin", "/usr/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(target))
            .find(|p| p.exists())
            .expect("coreutils true/false");
        symlink(target, dir.path().join(name)).expect("symlink");
    }
    dir
}

#[test]
fn a_bad_config_is_refused_before_any_command_runs() {
    let config = CaptureConfig {
        exclude_inbound_ports: vec![15006],
        ..CaptureConfig::default()
    };
    // No tools on the search path: were validation skipped, nothing could run.
    let nothing = fake_tools(&[]);
    let runner = Runner::current().with_search_path(vec![nothing.path().to_owned()]);
    let error = install_with(&config, &runner).expect_err("validated before any command runs");
    assert!(matches!(
        error,
        CaptureError::CapturePortExcluded {
            field: "inbound_port",
            port: 15006,
            list: "exclude_inbound_ports"
        }
    ));
}

#[test]
fn missing_tools_are_named_before_anything_changes() {
    let empty = fake_tools(&[]);
    let runner = Runner::current().with_search_path(vec![empty.path().to_owned()]);
    let error = install_with(&CaptureConfig::default(), &runner).expect_err("no tools");
    assert_eq!(
        error.to_string(),
        "iptables-save is not installed: install the iptables package in the init image"
    );

    // iptables is there but ip6tables is not: install fails before it applies
    // anything (there is no iptables-restore to apply with, and it is not asked for).
    let v4_only = fake_tools(&[("iptables-save", "true")]);
    let runner = Runner::current().with_search_path(vec![v4_only.path().to_owned()]);
    let error = install_with(&CaptureConfig::default(), &runner).expect_err("no ip6tables");
    assert_eq!(
        error.to_string(),
        "ip6tables-save is not installed: install the iptables package in the init image, \
         or set --ipv6=false (PALISADE_IPV6=false)"
    );
    let v4 = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    let error = install_with(&v4, &runner).expect_err("no iptables-restore");
    assert!(matches!(
        error,
        CaptureError::NotInstalled {
            tool: "iptables-restore",
            ..
        }
    ));

    // Nothing of ours can exist without ip6tables, so remove is content.
    remove_with(&CaptureConfig::default(), &runner).expect("nothing to remove");
}

#[test]
fn a_refused_batch_reports_the_command_and_status() {
    let dir = fake_tools(&[("iptables-save", "true"), ("iptables-restore", "false")]);
    let runner = Runner::current().with_search_path(vec![dir.path().to_owned()]);
    let v4 = CaptureConfig {
        ipv6: false,
        ..CaptureConfig::default()
    };
    let error = install_with(&v4, &runner).expect_err("restore fails");
    assert_eq!(
        error.to_string(),
        "iptables-restore --noflush --wait=10 failed (exit 1): ; does the container have NET_ADMIN?"
    );
}
