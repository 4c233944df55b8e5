//! Notices when files change, with `notify`, so configuration is reloaded
//! without a restart.
//!
//! Parent directories are watched rather than the files: Kubernetes swaps a
//! mounted Secret or ConfigMap by renaming a symlink (`..data`), and editors
//! replace files by rename; neither shows up as a write to the old inode. Events
//! are coalesced over a short debounce so a three-file update is read once, and
//! a slow periodic tick catches anything a filesystem failed to report.

use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::error;

/// How long events are coalesced before the reload runs.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// A reload is tried this often even without events.
pub const POLL: Duration = Duration::from_secs(30);

/// A running watch; dropping it stops the watch.
#[derive(Debug)]
pub struct FileWatch {
    _watcher: RecommendedWatcher,
    events: mpsc::Receiver<()>,
}

// === impl FileWatch ===

impl FileWatch {
    /// Starts watching the directories holding `paths`.
    pub fn new(paths: &[&Path]) -> Result<Self, notify::Error> {
        let (tx, events) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    // A full channel already means "reload pending".
                    let _ = tx.try_send(());
                }
            })?;
        let dirs: BTreeSet<PathBuf> = paths
            .iter()
            .map(|p| {
                if p.is_dir() {
                    p.to_path_buf()
                } else {
                    p.parent()
                        .filter(|d| !d.as_os_str().is_empty())
                        .unwrap_or(Path::new("."))
                        .to_path_buf()
                }
            })
            .collect();
        for dir in &dirs {
            watcher.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(Self {
            _watcher: watcher,
            events,
        })
    }

    /// Waits until the files may have changed: an event settled for
    /// [`DEBOUNCE`], or [`POLL`] elapsed.
    pub async fn changed(&mut self) {
        tokio::select! {
            Some(()) = self.events.recv() => {}
            () = tokio::time::sleep(POLL) => return,
        }
        // Let a burst of writes finish, then swallow the events it caused.
        loop {
            tokio::select! {
                Some(()) = self.events.recv() => {}
                () = tokio::time::sleep(DEBOUNCE) => return,
            }
        }
    }
}

/// Calls `reload` each time `path` (a file, or a directory's files) may have
/// changed, until `stop`. A watch that cannot start is logged, not fatal:
/// the current configuration stays in use.
pub async fn reload_on_change(
    path: &Path,
    stop: impl Future<Output = ()>,
    mut reload: impl FnMut(),
) {
    let mut watch = match FileWatch::new(&[path]) {
        Ok(w) => w,
        Err(error) => {
            error!(%error, path = %path.display(), "cannot watch for changes; edits take effect only after a restart");
            return;
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = watch.changed() => reload(),
        }
    }
}
