//! Cleaning up after a benchmark that was killed with SIGKILL: the process
//! groups still running are listed in a file, and a shell outside this
//! process kills them when this process is gone.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context, Result};

/// The process groups started here and still running, listed in a file for
/// the watchdog.
#[derive(Debug)]
pub struct Groups {
    file: PathBuf,
    live: Mutex<Vec<u32>>,
}

/// A shell in its own process group that waits for this process to end and
/// then kills every process group still listed and removes the temporary
/// directory: what `Drop` cannot do when this process is killed with SIGKILL
/// (an nginx worker, for one, outlives its master). Stopped on drop.
#[derive(Debug)]
pub struct Watchdog(Child);

// === impl Groups ===

impl Groups {
    /// An empty list, kept in `dir/process-groups`.
    pub fn new(dir: &Path) -> Self {
        Self {
            file: dir.join("process-groups"),
            live: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn add(&self, pgid: u32) {
        self.update(|g| g.push(pgid));
    }

    pub(super) fn remove(&self, pgid: u32) {
        self.update(|g| g.retain(|x| *x != pgid));
    }

    fn update(&self, f: impl FnOnce(&mut Vec<u32>)) {
        if let Ok(mut live) = self.live.lock() {
            f(&mut live);
            let text: String = live.iter().map(|g| format!("{g}\n")).collect();
            let tmp = self.file.with_extension("tmp");
            if fs::write(&tmp, text).is_ok() {
                let _ = fs::rename(&tmp, &self.file);
            }
        }
    }
}

// === impl Watchdog ===

impl Watchdog {
    /// Starts the shell for the groups of `groups` and the directory `dir`.
    pub fn start(groups: &Groups, dir: &Path) -> Result<Self> {
        let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done
if [ -f "$2" ]; then while read -r g; do kill -9 "-$g" 2>/dev/null; done < "$2"; fi
rm -rf "$3""#;
        let child = Command::new("sh")
            .args(["-c", script, "palisade-bench-proxy-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&groups.file)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the watchdog shell")?;
        Ok(Self(child))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
