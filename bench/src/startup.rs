//! Section 5, start-up and footprint: process start → `GET /` answered, idle RSS, binary size,
//! and the Python equivalent's floor (importing the three SDKs).

use std::{path::Path, process::Command, time::Duration};

use anyhow::Result;

use crate::{
    Config, Stack,
    procs::{Stats, run_measured},
    report::{Report, list, mb, median, secs, verdict},
    stack::{Containers, Handler},
};

const G: &str = "5 start-up";

struct Boot {
    start: Vec<f64>,
    idle: Vec<f64>,
}

fn boot(cfg: &Config, stack: &Stack, bin: &Path, tag: &str) -> Result<Boot> {
    let c = Containers::named("boot");
    let (mut start, mut idle) = (vec![], vec![]);
    for i in 0..cfg.startup_runs {
        let h = Handler::start(
            bin,
            &stack.slow.endpoint(),
            stack.azurite.port,
            &c,
            cfg.work.join(format!("handler-boot-{tag}.log")),
        )?;
        start.push(h.ready_in.as_secs_f64());
        // Idle: after start-up work (the containers check) is over, nothing else happening.
        if i < cfg.runs {
            std::thread::sleep(Duration::from_millis(1500));
            idle.push(h.proc.rss()? as f64);
        }
    }
    Ok(Boot { start, idle })
}

pub fn run(cfg: &Config, stack: &Stack, rep: &mut Report) -> Result<()> {
    eprintln!("\n== 5. start-up: {} starts per binary", cfg.startup_runs);
    let python = {
        let mut v = vec![];
        // The first run compiles the packages' bytecode; it is not counted.
        for i in 0..=cfg.runs {
            let mut cmd = Command::new(&cfg.python);
            cmd.args(["-c", "import openai, azure.storage.blob, azure.identity"]);
            let r = run_measured(cmd, &cfg.work)?;
            if r.code != 0 {
                anyhow::bail!("the Python floor failed: {}", r.stderr);
            }
            if i > 0 {
                v.push(r.secs);
            }
        }
        v
    };
    let (bin, kind) = match &cfg.musl_handler {
        Some(m) => (m.clone(), "static musl, as deployed (dist/publish/handler)"),
        None => (
            cfg.bins.handler.clone(),
            "glibc release build, stripped (musl build unavailable)",
        ),
    };
    let main = boot(cfg, stack, &bin, "main")?;
    let start = median(&main.start);
    rep.row(
        G,
        &format!("process start → `GET /` answered ({kind})"),
        "≤ 50 ms",
        secs(start),
        format!("{:.2} of goal", start / 0.050),
        verdict(start <= 0.050),
        format!("{} starts: {}", main.start.len(), list(&main.start, secs)),
    );
    let idle = median(&main.idle);
    rep.row(
        G,
        "idle RSS after start-up",
        "≤ 20 MB",
        mb(idle),
        format!("{:.2} of goal", idle / 20e6),
        verdict(idle <= 20e6),
        format!("runs: {}", list(&main.idle, mb)),
    );
    let size = std::fs::metadata(&bin)?.len() as f64;
    rep.row(
        G,
        &format!("binary size ({kind})"),
        "≤ 20 MB",
        mb(size),
        format!("{:.2} of goal", size / 20e6),
        verdict(size <= 20e6),
        format!("{} bytes", size as u64),
    );
    let py = median(&python);
    let ratio = py / start;
    rep.row(
        G,
        "start-up vs the Python floor (`python -c \"import openai, azure.storage.blob, azure.identity\"`)",
        "≥ 20× faster",
        format!("{} vs {}", secs(start), secs(py)),
        format!("{ratio:.0}×"),
        verdict(ratio >= 20.0),
        format!("Python runs: {}", list(&python, secs)),
    );
    if cfg.musl_handler.is_some() {
        let gnu = boot(cfg, stack, &cfg.bins.handler, "gnu")?;
        rep.info(
            G,
            "start → `GET /`, glibc release build, for reference",
            format!(
                "{}, idle RSS {}, {}",
                secs(median(&gnu.start)),
                mb(median(&gnu.idle)),
                mb(std::fs::metadata(&cfg.bins.handler)?.len() as f64)
            ),
            format!("starts: {}", list(&gnu.start, secs)),
        );
    }
    Ok(())
}
