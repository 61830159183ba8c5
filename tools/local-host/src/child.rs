//! The custom handler as a child process, started and stopped the way the host does it.

use std::{
    path::Path,
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};

use crate::app_root::{HandlerDescription, Settings};

pub struct HandlerProcess {
    child: Child,
    pub port: u16,
    forwarders: Vec<JoinHandle<()>>,
}

/// A free loopback port, as the host picks one when `customHandler.port` is not set.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free local port")?;
    Ok(listener.local_addr()?.port())
}

impl HandlerProcess {
    /// Must be called from the main thread: on Linux the child is told to stop when the thread
    /// that spawned it ends, and only the main thread lives exactly as long as this program.
    pub fn start(
        description: &HandlerDescription,
        app_root: &Path,
        settings: &Settings,
        port: u16,
    ) -> Result<Self> {
        let mut cmd = Command::new(&description.executable);
        cmd.args(&description.arguments)
            .current_dir(&description.working_directory)
            // The host gives the app settings to the child as environment variables; this
            // process's environment already holds those that did not come from the file.
            .envs(settings.file_values().iter().map(|(k, v)| (k, v)))
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNCTIONS_HTTPWORKER_PORT", port.to_string())
            .env(
                "FUNCTIONS_CUSTOMHANDLER_WORKER_ID",
                uuid::Uuid::new_v4().to_string(),
            )
            .env("FUNCTIONS_APP_ROOT_PATH", app_root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: Ctrl-C reaches only this program, which then stops the
            // handler in order instead of both racing to exit.
            .process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
        unsafe {
            cmd.pre_exec(|| {
                // If this program is killed outright, the handler gets SIGTERM instead of
                // lingering on the port.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "cannot start the handler `{}` (build it with `cargo build`, then pass --handler target/debug/handler)",
                description.executable.display()
            )
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let forwarders = vec![
            tokio::spawn(forward(stdout, false)),
            tokio::spawn(forward(stderr, true)),
        ];
        Ok(Self {
            child,
            port,
            forwarders,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Polls `GET /` until anything answers, even a 404: only a socket error means "not yet".
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .no_proxy()
            .build()?;
        let url = format!("http://127.0.0.1:{}/", self.port);
        let deadline = Instant::now() + limit;
        loop {
            if client.get(&url).send().await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                self.drain_output().await;
                bail!("the handler exited during start-up ({status}); its output is above");
            }
            if Instant::now() > deadline {
                bail!(
                    "the handler did not answer on port {} within {} s (the host's limit)",
                    self.port,
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resolves when the handler exits by itself.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.drain_output().await;
        status
    }

    /// SIGTERM, a grace period for in-flight work, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: plain kill(2) on our own child's pid, which is not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    "the handler did not stop within {} s; killing it",
                    grace.as_secs()
                );
                let _ = self.child.kill().await;
            }
        }
        self.drain_output().await;
    }

    /// Lets the last lines of a stopped handler reach the terminal.
    async fn drain_output(&mut self) {
        for f in self.forwarders.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(2), f).await;
        }
    }
}

/// Copies the handler's output line by line, prefixed; stderr stays stderr, as the host logs
/// it at a different level.
async fn forward(stream: impl AsyncRead + Unpin, is_stderr: bool) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                if is_stderr {
                    eprintln!("[handler] {text}");
                } else {
                    println!("[handler] {text}");
                }
            }
        }
    }
}
