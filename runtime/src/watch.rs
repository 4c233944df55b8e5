//! Notices when files change, with `notify`, so configuration is reloaded
//! without a restart.
//!
//! Parent directories are watched rather than the files: Kubernetes swaps a
//! mounted Secret or ConfigMap by renaming a symlink (`..data`), and editors
//! replace files by rename; neither shows up as a write to the old inode. Only
//! events that name a watched file (or the `..data` swap of a mounted volume)
//! count, so a file beside it that is written all the time (a log) does not
//! hold reloads back. Events are coalesced over a short debounce, at most
//! [`MAX_DELAY`] in all, so a three-file update is read once, and a slow
//! periodic tick catches anything a filesystem failed to report.

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
/// A reload runs at most this long after the first event of a burst.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// A running watch; dropping it stops the watch.
#[derive(Debug)]
pub struct FileWatch {
    _watcher: RecommendedWatcher,
    events: mpsc::Receiver<()>,
}

// === impl FileWatch ===

impl FileWatch {
    /// Starts watching the directories holding `paths`: every file of a
    /// path that is a directory, or the files named.
    pub fn new(paths: &[&Path]) -> Result<Self, notify::Error> {
        let (tx, events) = mpsc::channel(1);
        let watched_dirs: BTreeSet<PathBuf> = paths
            .iter()
            .filter(|p| p.is_dir())
            .map(|p| p.to_path_buf())
            .collect();
        let watched_files: BTreeSet<std::ffi::OsString> = paths
            .iter()
            .filter(|p| !p.is_dir())
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect();
        let interesting = move |path: &Path| {
            path.parent().is_some_and(|d| watched_dirs.contains(d))
                || path.file_name().is_some_and(|name| {
                    watched_files.contains(name) || name.to_string_lossy().starts_with("..")
                })
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // A rescan notice names no path: anything may have changed.
                let relevant = event.paths.is_empty() || event.paths.iter().any(|p| interesting(p));
                if !event.kind.is_access() && relevant {
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
    /// [`DEBOUNCE`] (or [`MAX_DELAY`] passed since it), or [`POLL`] elapsed.
    pub async fn changed(&mut self) {
        tokio::select! {
            Some(()) = self.events.recv() => {}
            () = tokio::time::sleep(POLL) => return,
        }
        // Let a burst of writes finish, then swallow the events it caused.
        let latest = tokio::time::Instant::now() + MAX_DELAY;
        loop {
            tokio::select! {
                Some(()) = self.events.recv() => {}
                () = tokio::time::sleep(DEBOUNCE) => return,
                () = tokio::time::sleep_until(latest) => return,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `dir/app.log` every 20 ms until the returned flag is set.
    fn busy_log(dir: &Path) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        use std::{io::Write, sync::atomic::Ordering};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, path) = (stop.clone(), dir.join("app.log"));
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(path).expect("log");
            while !flag.load(Ordering::Relaxed) {
                let _ = writeln!(log, "a line");
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        stop
    }

    #[tokio::test]
    async fn a_busy_file_beside_the_watched_one_neither_triggers_nor_delays_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watched = dir.path().join("config.yaml");
        std::fs::write(&watched, "a: 1\n").expect("write");
        let mut watch = FileWatch::new(&[watched.as_path()]).expect("watch");
        let stop = busy_log(dir.path());

        // The log alone is no change.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), watch.changed())
                .await
                .is_err(),
            "a write to another file counted as a change"
        );
        // An edit by rename is seen within the debounce, although the log
        // goes on being written.
        let next = dir.path().join("config.next");
        std::fs::write(&next, "a: 2\n").expect("write");
        std::fs::rename(&next, &watched).expect("rename");
        let started = tokio::time::Instant::now();
        tokio::time::timeout(MAX_DELAY + Duration::from_secs(1), watch.changed())
            .await
            .expect("the edit is seen");
        assert!(
            started.elapsed() < MAX_DELAY + DEBOUNCE,
            "{:?}",
            started.elapsed()
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    #[tokio::test]
    async fn a_kubernetes_volume_swap_counts_as_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let watched = dir.path().join("ca.crt");
        std::fs::write(&watched, "x").expect("write");
        let mut watch = FileWatch::new(&[watched.as_path()]).expect("watch");
        // The kubelet's atomic writer renames `..data_tmp` onto `..data`.
        std::fs::write(dir.path().join("..data_tmp"), "y").expect("write");
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("rename");
        tokio::time::timeout(MAX_DELAY + Duration::from_secs(1), watch.changed())
            .await
            .expect("the swap is seen");
    }
}
