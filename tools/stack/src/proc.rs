//! A child process of the stack: started with its output captured (in memory, or in a log
//! file), waited on until it says it is ready, and killed when dropped.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::Error;

/// Where a child's stdout and stderr go.
#[derive(Debug, Clone, Default)]
pub enum Output {
    /// Kept in memory, line by line, for assertions (`TEST_SHOW_LOGS=1` also echoes it).
    #[default]
    Capture,
    /// Written straight to this file: nothing runs in this process per line, and the log
    /// outlives the run.
    File(PathBuf),
}

/// How to start a process of the stack.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub output: Output,
    /// The child is killed when the thread that started it ends, even if this process is
    /// killed outright (`PR_SET_PDEATHSIG`, Linux). Only for a program that starts its
    /// children from a thread that lives as long as it does (the benchmark's main thread).
    pub die_with_parent: bool,
}

enum Sink {
    Capture {
        lines: Arc<Mutex<Vec<String>>>,
        /// How many of the two streams their reader threads have read to the end.
        closed: Arc<AtomicUsize>,
    },
    File(PathBuf),
}

/// A running child, killed (and reaped) on drop.
pub struct Proc {
    name: String,
    child: Child,
    sink: Sink,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Proc {
    /// Starts `cmd` (stdin closed) with its output going where `options` says.
    pub fn spawn(name: &str, mut cmd: Command, options: &Options) -> Result<Proc, Error> {
        cmd.stdin(Stdio::null());
        let file = match &options.output {
            Output::Capture => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
            Output::File(path) => {
                let file = File::create(path)
                    .map_err(|e| Error::new(format!("cannot create {}: {e}", path.display())))?;
                let copy = file
                    .try_clone()
                    .map_err(|e| Error::new(format!("{}: {e}", path.display())))?;
                cmd.stdout(copy).stderr(file);
                Some(path.clone())
            }
        };
        if options.die_with_parent {
            die_with_parent(&mut cmd);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::new(format!("cannot start {name} ({cmd:?}): {e}")))?;
        let sink = match file {
            Some(path) => Sink::File(path),
            None => {
                let lines = Arc::new(Mutex::new(Vec::new()));
                let closed = Arc::new(AtomicUsize::new(0));
                for stream in [
                    Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
                    Box::new(child.stderr.take().expect("piped")),
                ] {
                    let (lines, closed) = (lines.clone(), closed.clone());
                    std::thread::spawn(move || {
                        for line in BufReader::new(stream).lines().map_while(Result::ok) {
                            if std::env::var_os("TEST_SHOW_LOGS").is_some() {
                                eprintln!("[child] {line}");
                            }
                            lines.lock().unwrap().push(line);
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
                Sink::Capture { lines, closed }
            }
        };
        Ok(Proc {
            name: name.to_string(),
            child,
            sink,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far, stdout and stderr.
    pub fn logs(&self) -> String {
        match &self.sink {
            Sink::Capture { lines, .. } => lines.lock().unwrap().join("\n"),
            Sink::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    fn line_with(&self, marker: &str) -> Option<String> {
        match &self.sink {
            Sink::Capture { lines, .. } => lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(marker))
                .cloned(),
            Sink::File(path) => std::fs::read_to_string(path)
                .ok()?
                .lines()
                .find(|l| l.contains(marker))
                .map(str::to_string),
        }
    }

    /// Waits until a line contains `marker`; returns it. Fails with the output so far when
    /// the process exits first or `timeout` passes (the process is killed then).
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> Result<String, Error> {
        self.wait_ready(marker, None, Duration::from_millis(5), timeout)
    }

    /// Waits until a line contains `marker`, then, with `probe`, until `GET /` on that port
    /// answers 200; polls every `every`. Returns the line. Fails with the output so far when
    /// the process exits first or `timeout` passes (the process is killed then).
    pub(crate) fn wait_ready(
        &mut self,
        marker: &str,
        probe: Option<u16>,
        every: Duration,
        timeout: Duration,
    ) -> Result<String, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.line_with(marker)
                && probe.is_none_or(|port| get_root(port).unwrap_or(false))
            {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain();
                return Err(Error::with_output(
                    format!("{} exited ({status}) before it was ready", self.name),
                    self.logs(),
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(Error::with_output(
                    format!("{} was not ready within {timeout:?}", self.name),
                    self.logs(),
                ));
            }
            std::thread::sleep(every);
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it to exit, so a
    /// service that persists to disk (Azurite with `--location`) can save its state first.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        // SAFETY: kill(2) on our own child, not yet reaped (reaping happens only here or
        // on drop), so the pid is still ours.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit by itself (a test fault point aborts it), then for its
    /// last output lines: they may still sit in the pipes when it has exited, and a caller
    /// reads `logs()` next.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain();
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Bounded: a grandchild that inherited a pipe could keep it open.
    fn drain(&self) {
        if let Sink::Capture { closed, .. } = &self.sink {
            let until = Instant::now() + Duration::from_secs(5);
            while closed.load(Ordering::SeqCst) < 2 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The child dies with the thread that started it, even on SIGKILL (`PR_SET_PDEATHSIG`).
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// One `GET /` over a fresh connection; `Ok(true)` on a 200. Plain bytes on a socket: the
/// start-up benchmark polls with it every 250 µs.
fn get_root(port: u16) -> std::io::Result<bool> {
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
