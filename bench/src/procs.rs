//! Child processes: one-shot commands measured with `wait4` (wall time, CPU, peak RSS), and
//! long-running services (Azurite, the emulator, the handler) killed when dropped, and also
//! when this process dies (`PR_SET_PDEATHSIG`).

use std::{
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Children die with us, even on SIGKILL. Only call from the main thread: the signal is tied
/// to the thread that forked, and the driver's runtime runs on the main thread only.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

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

/// A long-running child, killed on drop. Its output goes to `log`.
pub struct Service {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Service> {
        let file = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Service {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line of the log contains `marker`; returns that line.
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                return Ok(line.to_string());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}) during start-up:\n{text}", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not start within {timeout:?}:\n{text}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `VmHWM` (peak RSS) of the running process, bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        status_kb(self.pid(), "VmHWM:").map(|kb| kb * 1024)
    }

    /// `VmRSS` (current RSS) of the running process, bytes.
    pub fn rss(&self) -> Result<u64> {
        status_kb(self.pid(), "VmRSS:").map(|kb| kb * 1024)
    }

    /// CPU time (user + system) the process has used so far, seconds.
    pub fn cpu_secs(&self) -> Result<f64> {
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

    /// `/proc/PID/io` counters of the whole process (all threads).
    pub fn io(&self) -> Result<Io> {
        let text = std::fs::read_to_string(format!("/proc/{}/io", self.pid()))?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Io {
            rchar: get("rchar:"),
            wchar: get("wchar:"),
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Io {
    /// Bytes the process received from read-like calls: sockets, pipes and files alike.
    pub rchar: u64,
    pub wchar: u64,
}

fn status_kb(pid: u32, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One `GET /` over a fresh connection; `Ok(true)` on a 200.
pub fn get_root(port: u16) -> std::io::Result<bool> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// Polls `GET /` until it answers 200; returns the time since `since`.
pub fn wait_ready(
    port: u16,
    since: Instant,
    svc: &mut Service,
    timeout: Duration,
) -> Result<Duration> {
    loop {
        if let Ok(true) = get_root(port) {
            return Ok(since.elapsed());
        }
        if let Ok(Some(status)) = svc.child.try_wait() {
            bail!(
                "{} exited ({status}) during start-up:\n{}",
                svc.name,
                svc.log_text()
            );
        }
        if since.elapsed() > timeout {
            bail!("{} did not answer GET / within {timeout:?}", svc.name);
        }
        std::thread::sleep(Duration::from_micros(250));
    }
}
