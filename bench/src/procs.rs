//! Child processes: one-shot commands measured with `wait4` (wall time, CPU, peak RSS), and
//! what the driver reads of the long-running services (Azurite, the emulator, the handler)
//! that `aoai-stack` starts: memory, CPU and I/O from `/proc`.

use std::{
    fs::File,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use aoai_stack::{Proc, die_with_parent};

/// What a finished one-shot command cost.
#[derive(Debug, Clone)]
pub struct Run {
    pub secs: f64,
    pub user_secs: f64,
    pub sys_secs: f64,
    /// Peak resident set size (`ru_maxrss`), bytes.
    pub max_rss: u64,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end; stdout and stderr go to files in `scratch` (so a chatty child never
/// blocks on a pipe) and are read back afterwards.
pub fn run_measured(mut cmd: Command, scratch: &Path) -> Result<Run> {
    let out_path = scratch.join(format!("run-{}.out", uuid::Uuid::new_v4()));
    let err_path = scratch.join(format!("run-{}.err", uuid::Uuid::new_v4()));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    die_with_parent(&mut cmd);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let secs = start.elapsed().as_secs_f64();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    // `child` was reaped by wait4: forget it so nothing waits on a reused pid.
    std::mem::forget(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(Run {
        secs,
        user_secs: tv(usage.ru_utime),
        sys_secs: tv(usage.ru_stime),
        max_rss: usage.ru_maxrss as u64 * 1024,
        code,
        stdout,
        stderr,
    })
}

/// What the driver reads of a running service.
pub trait Stats {
    /// `VmHWM` (peak RSS) of the running process, bytes.
    fn peak_rss(&self) -> Result<u64>;
    /// `VmRSS` (current RSS) of the running process, bytes.
    fn rss(&self) -> Result<u64>;
    /// CPU time (user + system) the process has used so far, seconds.
    fn cpu_secs(&self) -> Result<f64>;
    /// `/proc/PID/io` counters of the whole process (all threads).
    fn io(&self) -> Result<Io>;
}

impl Stats for Proc {
    fn peak_rss(&self) -> Result<u64> {
        status_kb(self.pid(), "VmHWM:").map(|kb| kb * 1024)
    }

    fn rss(&self) -> Result<u64> {
        status_kb(self.pid(), "VmRSS:").map(|kb| kb * 1024)
    }

    fn cpu_secs(&self) -> Result<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name (which may hold spaces): state is field 3,
        // utime 14 and stime 15.
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok((ticks(14) + ticks(15)) / hz)
    }

    fn io(&self) -> Result<Io> {
        let text = std::fs::read_to_string(format!("/proc/{}/io", self.pid()))?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Io {
            rchar: get("rchar:"),
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Io {
    /// Bytes the process received from read-like calls: sockets, pipes and files alike.
    pub rchar: u64,
}

fn status_kb(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}
