//! What the benchmarks read from `/proc`: the CPU time of a process and of the
//! whole machine, a process's state and descendants, its memory, and whether a
//! port is listening.

use std::{fs, process::Command};

use anyhow::{Context, Result};

/// CPU clock ticks of the whole machine, from the `cpu` line of `/proc/stat`
/// (all cores together).
#[derive(Clone, Copy, Debug, Default)]
pub struct MachineTicks {
    /// Every state summed: user nice system idle iowait irq softirq steal.
    pub total: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Taken by the hypervisor.
    pub steal: u64,
}

/// utime + stime of a process (all its threads, live and exited), in clock
/// ticks; `pid` is a number or `self`.
pub fn process_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let fields = stat_fields(&text).with_context(|| format!("{path} has no `(comm)` field"))?;
    // Fields 14 and 15 of proc(5); `fields[0]` is field 3 (state).
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} is too short"))?
            .parse()
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// The state letter of a process (`R`, `S`, `Z`, ...), `None` when it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&text)?.first()?.chars().next()
}

/// `pid` and all its descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(text) = fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Field 4 of proc(5): the parent's pid.
            let ppid = stat_fields(&text).and_then(|f| f.get(1)?.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (p, pp) in &parents {
            if *pp == parent && !tree.contains(p) {
                tree.push(*p);
            }
        }
        i += 1;
    }
    tree
}

/// The number of a `Key:  N kB` (or plain number) line of `/proc/PID/status`.
pub fn status_value(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{path} has no {key}"))
}

/// Proportional set size of a process, KiB (`/proc/PID/smaps_rollup`).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Whether something listens on 127.0.0.1:`port` (or any address), from
/// `/proc/net/tcp`, without connecting.
pub fn is_listening(port: u16) -> bool {
    let needle = format!(":{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|text| {
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&needle) && f[3] == "0A"
        })
    })
}

/// `getconf CLK_TCK`, or Linux's usual 100 if that cannot be run.
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The fields of `/proc/PID/stat` after the command name, from field 3
/// (state) on. The name may hold spaces and parentheses, so the fields
/// follow the last `)`.
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    Some(text.rsplit_once(')')?.1.split_whitespace().collect())
}

// === impl MachineTicks ===

impl MachineTicks {
    /// The `cpu` line of `/proc/stat`: all cores together.
    pub fn read() -> Result<Self> {
        let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no `cpu` line")?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| {
                v.parse()
                    .context("/proc/stat: a `cpu` field is not a number")
            })
            .collect::<Result<_>>()?;
        let at = |i: usize| values.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal; guest time is inside user.
        Ok(Self {
            total: (0..8).map(at).sum(),
            idle: at(3) + at(4),
            steal: at(7),
        })
    }

    /// Ticks some task ran: neither idle (nor iowait) nor stolen by the hypervisor.
    pub fn busy(&self) -> u64 {
        self.total
            .saturating_sub(self.idle)
            .saturating_sub(self.steal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_start_after_the_last_parenthesis() {
        let line = "42 (a (weird) name) S 1 42 42 0 -1 4194560 0 0 0 0 7 3 0 0 20 0 1";
        let fields = stat_fields(line).expect("a (comm) field");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[1], "1");
        assert_eq!((fields[11], fields[12]), ("7", "3"));
    }

    #[test]
    fn this_process_has_ticks_a_state_and_a_tree() {
        process_ticks("self").expect("/proc/self/stat is readable");
        let me = std::process::id();
        assert!(process_state(me).is_some_and(|s| s != 'Z'));
        assert_eq!(process_tree(me).first(), Some(&me));
        assert!(status_value(me, "VmRSS").expect("a VmRSS line") > 0);
    }

    #[test]
    fn machine_ticks_are_read_and_busy_is_bounded_by_total() {
        let m = MachineTicks::read().expect("/proc/stat is readable");
        assert!(m.total > 0);
        assert!(m.busy() <= m.total);
    }
}
