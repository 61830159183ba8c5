//! Section 4, tick scale: one timer tick with N active jobs (1,000 by default; `--tick-jobs`)
//! against a sequential loop of the same N retrieve calls, on loopback and with a fixed added
//! latency per request; and how many service calls a tick makes per running job.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::StreamExt;

use crate::{
    Config, Stack,
    generate::small_input,
    procs::Stats,
    proxy::Proxy,
    report::{Report, list, median, secs, verdict},
    stack::{self, Containers, Handler},
};

const G: &str = "4 tick scale";

/// Parses the tick's summary line: `tick done in N ms: S new input(s), A active job(s), H
/// finished, F fault(s)` → (S, A, F).
fn tick_counts(logs: &[String]) -> Option<(u64, u64, u64)> {
    let line = logs.iter().find(|l| l.starts_with("tick done in"))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    // [ms, swept, active, finished, faults]
    (nums.len() >= 5).then(|| (nums[1], nums[2], nums[4]))
}

async fn timed_ticks(h: &Handler, n: usize, jobs: u64) -> Result<Vec<f64>> {
    let mut t = vec![];
    for _ in 0..n {
        let (status, logs, s) = h.tick().await?;
        match tick_counts(&logs) {
            Some((0, active, 0)) if status == 200 && active == jobs => t.push(s),
            _ => bail!("unexpected tick: HTTP {status}: {:?}", logs.last()),
        }
    }
    Ok(t)
}

/// The sequential loops retrieve at most this many batches; beyond, the time is scaled to all
/// of them (a sequential loop's time is linear in its calls: with +50 ms each, 10,000 would
/// take over 8 minutes).
const LOOP_SAMPLE: usize = 1000;

/// A sequential loop over `ids` (over the first [`LOOP_SAMPLE`], scaled to all).
async fn sequential_loop(endpoint: &str, ids: &[String]) -> Result<f64> {
    let sample = &ids[..ids.len().min(LOOP_SAMPLE)];
    let t = sequential_loop_over(endpoint, sample).await?;
    Ok(t * ids.len() as f64 / sample.len().max(1) as f64)
}

async fn sequential_loop_over(endpoint: &str, ids: &[String]) -> Result<f64> {
    let client = stack::batch_client(endpoint)?;
    let t0 = Instant::now();
    for id in ids {
        let b = client.retrieve(id).await?;
        if b.status.is_terminal() {
            bail!("batch {id} is {} (expected it to stay active)", b.status);
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Uploads the inputs `range` (three small requests each) into the input container.
async fn upload_inputs(stack: &Stack, c: &Containers, range: std::ops::Range<u64>) -> Result<()> {
    let uploads: Vec<Result<()>> = futures::stream::iter(range)
        .map(|i| {
            let store = &stack.store;
            let input = &c.input;
            async move {
                stack::put_small(
                    store,
                    input,
                    &format!("job-{i:05}.jsonl"),
                    small_input(&format!("j{i}"), 3),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    uploads.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(())
}

pub async fn run(cfg: &Config, stack: &Stack, rep: &mut Report) -> Result<()> {
    let jobs = cfg.tick_jobs;
    let slice = match cfg.tick_sweep {
        0 => jobs,
        n => n.min(jobs),
    }
    .max(1);
    eprintln!("\n== 4. tick scale: {jobs} active jobs");
    let c = Containers::named("tick");
    c.create(&stack.store).await?;

    // The slow emulator (a step a day): every batch stays `validating`, i.e. active.
    let h = Handler::start(
        &cfg.bins.handler,
        &stack.slow.endpoint(),
        stack.azurite.port,
        &c,
        cfg.work.join("handler-tick.log"),
    )?;
    // The jobs are made by the handler itself, as a backlog dropped in without events would
    // be: each slice of inputs is uploaded, then taken in by one tick's sweep (validate,
    // claim, create each). Slices, not one sweep of all: what is measured is the ticks
    // after, and a slice a tick is how a backlog arrives over the day.
    let mut sweeps = vec![];
    let mut made = 0;
    let t0 = Instant::now();
    while made < jobs {
        let n = slice.min(jobs - made);
        let t = Instant::now();
        upload_inputs(stack, &c, made..made + n).await?;
        let uploaded = t.elapsed().as_secs_f64();
        let (status, logs, sweep) = h.tick().await?;
        match tick_counts(&logs) {
            Some((swept, active, 0)) if status == 200 && swept == n && active == made + n => {}
            _ => bail!(
                "the sweep tick did not take in {n} inputs ({made} before): HTTP {status}: {:?}",
                logs.last()
            ),
        }
        made += n;
        sweeps.push(sweep);
        eprintln!(
            "  {made}/{jobs}: uploaded {n} in {uploaded:.1} s, swept in {sweep:.1} s; Azurite: {:.0} s CPU, RSS {:.0} MB",
            stack.azurite.proc.cpu_secs()?,
            stack.azurite.proc.rss()? as f64 / 1e6
        );
    }
    let total: f64 = sweeps.iter().sum();
    rep.info(
        G,
        &format!(
            "the ticks whose sweeps take in {jobs} new inputs, {slice} a tick (validate, claim, create each)"
        ),
        secs(total),
        format!(
            "{} ticks: first {}, last {}; {:.1} ms per intake; {:.0} s with the uploads",
            sweeps.len(),
            secs(sweeps[0]),
            secs(*sweeps.last().unwrap_or(&0.0)),
            total * 1e3 / jobs as f64,
            t0.elapsed().as_secs_f64()
        ),
    );
    let cpu = |h: &Handler| -> Result<[f64; 3]> {
        Ok([
            h.proc.cpu_secs()?,
            stack.azurite.proc.cpu_secs()?,
            stack.slow.proc.cpu_secs()?,
        ])
    };
    let before = cpu(&h)?;
    let ticks = timed_ticks(&h, cfg.runs, jobs).await?;
    let after = cpu(&h)?;
    let per_tick: Vec<f64> = (0..3)
        .map(|i| (after[i] - before[i]) / ticks.len() as f64)
        .collect();
    let peak = h.proc.peak_rss()? as f64;
    drop(h);

    let client = stack::batch_client(&stack.slow.endpoint())?;
    let mut ids = vec![];
    let mut after: Option<String> = None;
    loop {
        let page = client.list_page(after.as_deref(), 100).await?;
        ids.extend(
            page.data
                .iter()
                .filter(|b| {
                    b.input_blob
                        .as_deref()
                        .is_some_and(|u| u.contains("/tick-in/"))
                })
                .map(|b| b.id.clone()),
        );
        if !page.has_more || page.data.is_empty() {
            break;
        }
        after = page.data.last().map(|b| b.id.clone());
    }
    if ids.len() as u64 != jobs {
        bail!("found {} tick batches, expected {jobs}", ids.len());
    }
    let mut seq = vec![];
    for _ in 0..cfg.slow_runs {
        seq.push(sequential_loop(&stack.slow.endpoint(), &ids).await?);
    }
    let ratio = median(&seq) / median(&ticks);
    let scaled = if jobs as usize > LOOP_SAMPLE {
        format!(" (the loop timed over {LOOP_SAMPLE}, scaled)")
    } else {
        String::new()
    };
    rep.row(
        G,
        &format!("one tick, {jobs} active jobs, loopback (no added latency) vs {jobs} sequential retrieves{scaled}"),
        "at least as fast (≥ 1×)",
        format!("{} vs {}", secs(median(&ticks)), secs(median(&seq))),
        format!("{ratio:.2}×"),
        verdict(ratio >= 1.0),
        format!(
            "ticks: {}; loops: {}; CPU per tick: handler {:.2} s, Azurite {:.2} s, emulator {:.2} s (2 cores); handler peak RSS {:.1} MB",
            list(&ticks, secs),
            list(&seq, secs),
            per_tick[0],
            per_tick[1],
            per_tick[2],
            peak / 1e6
        ),
    );

    let parts = breakdown(cfg, stack, &c, jobs).await?;
    rep.info(
        G,
        &format!("where a loopback tick of {jobs} active jobs goes: each kind of call, its count and summed time (through proxies adding nothing)"),
        secs(parts.0),
        parts.1,
    );

    // With latency: every call to the service and to storage waits a fixed time first.
    let (lo, ls) = (cfg.openai_latency_ms, cfg.storage_latency_ms);
    let oproxy = Proxy::start(&stack.slow.endpoint(), Duration::from_millis(lo)).await?;
    let sproxy = Proxy::start(
        &format!("http://127.0.0.1:{}", stack.azurite.port),
        Duration::from_millis(ls),
    )
    .await?;
    let h = Handler::start(
        &cfg.bins.handler,
        &oproxy.url(),
        sproxy.port,
        &c,
        cfg.work.join("handler-tick-latency.log"),
    )?;
    oproxy.take();
    sproxy.take();
    let lticks = timed_ticks(&h, cfg.slow_runs, jobs).await?;
    drop(h);
    let calls = (oproxy.take().len(), sproxy.take().len());
    let lseq = sequential_loop(&oproxy.url(), &ids).await?;
    let ratio = lseq / median(&lticks);
    rep.row(
        G,
        &format!(
            "one tick, {jobs} active jobs, +{lo} ms per service call and +{ls} ms per storage call vs the same sequential retrieves (+{lo} ms each){scaled}"
        ),
        "≥ 10× faster",
        format!("{} vs {}", secs(median(&lticks)), secs(lseq)),
        format!("{ratio:.2}×"),
        verdict(ratio >= 10.0),
        format!(
            "ticks: {}; {} service and {} storage calls in {} ticks",
            list(&lticks, secs),
            calls.0,
            calls.1,
            lticks.len()
        ),
    );
    let per_job = calls.0 as f64 / (lticks.len() as f64 * jobs as f64);
    rep.row(
        G,
        &format!("service calls per running job per tick, {jobs} active jobs"),
        "≤ 0.05 (from 1,000 jobs)",
        format!("{per_job:.4}"),
        format!("{:.2} of goal", per_job / 0.05),
        verdict(per_job <= 0.05),
        format!(
            "{} service calls and {} storage calls in {} ticks (with latency)",
            calls.0,
            calls.1,
            lticks.len()
        ),
    );
    let worst = ticks.iter().chain(&lticks).fold(0.0f64, |a, b| a.max(*b));
    rep.row(
        G,
        &format!("longest tick with {jobs} active jobs vs the 5-minute period"),
        "≤ 5% (15 s)",
        secs(worst),
        format!("{:.1}% of 300 s", worst / 3.0),
        verdict(worst <= 15.0),
        String::new(),
    );
    pipeline_clear(stack, &c).await
}

/// One loopback tick through proxies that add no latency (after one to warm up), its calls
/// grouped by kind: (the tick's seconds, "kind: count, summed seconds; ...").
async fn breakdown(
    cfg: &Config,
    stack: &Stack,
    c: &Containers,
    jobs: u64,
) -> Result<(f64, String)> {
    let oproxy = Proxy::start(&stack.slow.endpoint(), Duration::ZERO).await?;
    let sproxy = Proxy::start(
        &format!("http://127.0.0.1:{}", stack.azurite.port),
        Duration::ZERO,
    )
    .await?;
    let h = Handler::start(
        &cfg.bins.handler,
        &oproxy.url(),
        sproxy.port,
        c,
        cfg.work.join("handler-tick-breakdown.log"),
    )?;
    timed_ticks(&h, 1, jobs).await?;
    oproxy.take();
    sproxy.take();
    let azurite = stack.azurite.proc.cpu_secs()?;
    let handler = h.proc.cpu_secs()?;
    let tick = timed_ticks(&h, 1, jobs).await?[0];
    let azurite = stack.azurite.proc.cpu_secs()? - azurite;
    let handler = h.proc.cpu_secs()? - handler;
    drop(h);
    let mut kinds: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for r in oproxy.take() {
        let kind = if r.path.trim_end_matches('/').ends_with("/batches") {
            "service: list page".to_string()
        } else {
            format!("service: {} {}", r.method, r.path)
        };
        let e = kinds.entry(kind).or_default();
        e.0 += 1;
        e.1 += r.secs;
    }
    for r in sproxy.take() {
        // `/devstoreaccount1/{container}/{blob}`: a listing names no blob.
        let mut segs = r.path.trim_start_matches('/').splitn(3, '/').skip(1);
        let container = segs.next().unwrap_or_default();
        let kind = match segs.next() {
            None | Some("") => {
                let prefix = r
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("prefix="))
                    .map(|p| {
                        percent_encoding::percent_decode_str(p)
                            .decode_utf8_lossy()
                            .into_owned()
                    })
                    .unwrap_or_default();
                format!("storage: list {container}/{prefix}")
            }
            Some(blob) => {
                let dir = blob.split_once('/').map_or(blob, |(d, _)| d);
                format!("storage: {} {container}/{dir}", r.method)
            }
        };
        let e = kinds.entry(kind).or_default();
        e.0 += 1;
        e.1 += r.secs;
    }
    let parts: Vec<String> = kinds
        .iter()
        .map(|(k, (n, t))| format!("{k}: {n}, {}", secs(*t)))
        .collect();
    let text = format!(
        "{}; CPU in that tick: Azurite {azurite:.2} s, handler {handler:.2} s",
        parts.join("; ")
    );
    eprintln!("  breakdown of one loopback tick ({}): {text}", secs(tick));
    Ok((tick, text))
}

async fn pipeline_clear(stack: &Stack, c: &Containers) -> Result<()> {
    crate::pipeline::clear(stack, c).await
}
