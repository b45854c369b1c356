//! Server and generator accounting from /proc: CPU seconds and resident memory.

use std::collections::BTreeMap;

use serde::Serialize;

/// Clock ticks per second for the times in /proc/<pid>/stat.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU seconds of a process: user + system, plus those of its waited-for children.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub(crate) struct Cpu {
    pub user_s: f64,
    pub system_s: f64,
    pub children_s: f64,
}

impl Cpu {
    pub(crate) fn total(&self) -> f64 {
        self.user_s + self.system_s + self.children_s
    }

    pub(crate) fn minus(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            user_s: self.user_s - earlier.user_s,
            system_s: self.system_s - earlier.system_s,
            children_s: self.children_s - earlier.children_s,
        }
    }

    fn plus(&self, other: &Cpu) -> Cpu {
        Cpu {
            user_s: self.user_s + other.user_s,
            system_s: self.system_s + other.system_s,
            children_s: self.children_s + other.children_s,
        }
    }
}

/// Reads `/proc/<pid>/stat` (`pid` "self" works too).
pub(crate) fn cpu_of(pid: &str) -> Result<Cpu, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let after = text
        .rfind(')')
        .map(|at| &text[at + 1..])
        .ok_or_else(|| format!("{path}: no command field"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17),
    // i.e. indexes 11..=14 of `fields` (which starts at field 3).
    let field = |index: usize| -> Result<f64, String> {
        fields
            .get(index)
            .and_then(|v| v.parse::<i64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| format!("{path}: field {} missing", index + 3))
    };
    let tick = ticks_per_second();
    Ok(Cpu {
        user_s: field(11)? / tick,
        system_s: field(12)? / tick,
        children_s: (field(13)? + field(14)?) / tick,
    })
}

/// Sum of the CPU of several processes.
pub(crate) fn cpu_sum(pids: &[u32]) -> Result<Cpu, String> {
    pids.iter().try_fold(Cpu::default(), |acc, pid| {
        Ok(acc.plus(&cpu_of(&pid.to_string())?))
    })
}

/// Resident memory of a process (KiB), from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub(crate) struct Memory {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
}

pub(crate) fn memory_of(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut memory = Memory::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match key {
            "VmRSS" => memory.rss_kib = kib,
            "RssAnon" => memory.anon_kib = kib,
            "RssFile" => memory.file_kib = kib,
            "RssShmem" => memory.shmem_kib = kib,
            _ => {}
        }
    }
    Ok(memory)
}

pub(crate) fn memory_sum(pids: &[u32]) -> Result<Memory, String> {
    pids.iter().try_fold(Memory::default(), |acc, pid| {
        let m = memory_of(*pid)?;
        Ok(Memory {
            rss_kib: acc.rss_kib + m.rss_kib,
            anon_kib: acc.anon_kib + m.anon_kib,
            file_kib: acc.file_kib + m.file_kib,
            shmem_kib: acc.shmem_kib + m.shmem_kib,
        })
    })
}

/// Busy CPU seconds of the whole machine (all cores, everything but idle and iowait).
pub(crate) fn system_busy_s() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = values
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy / ticks_per_second()
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Kernel TCP counters that explain slow connects (accept-queue overflows, SYN cookies).
pub(crate) const TCP_COUNTERS: &[&str] = &[
    "ListenOverflows",
    "ListenDrops",
    "SyncookiesSent",
    "TCPReqQFullDrop",
    "TCPTimeouts",
];

/// Reads [`TCP_COUNTERS`] from `/proc/net/netstat` (system-wide).
pub(crate) fn tcp_counters() -> BTreeMap<String, i64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    let mut counters = BTreeMap::new();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if TCP_COUNTERS.contains(&name) {
                counters.insert(name.to_string(), value.parse().unwrap_or(0));
            }
        }
    }
    counters
}

/// `after - before` per counter.
pub(crate) fn counter_delta(
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
) -> BTreeMap<String, i64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let cpu = cpu_of("self").expect("readable");
        assert!(cpu.total() >= 0.0);
        let memory = memory_of(std::process::id()).expect("readable");
        assert!(memory.rss_kib > 0);
        let counters = tcp_counters();
        assert!(counters.contains_key("ListenOverflows"), "{counters:?}");
    }
}
