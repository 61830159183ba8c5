//! Through Azurite and the emulator: 3. submit latency against a bare download, 2b. submit
//! memory (200 MB; 1 GB, which is split into parts), 2c. harvest memory and time, 6. bytes
//! through the handler.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;

use crate::{
    Config, Inputs, Stack,
    procs::Stats,
    proxy::{Proxy, Record},
    report::{Report, list, mb, median, secs, verdict},
    stack::{self, Containers, Handler, batch_id_in, wait_batch_end},
};

const M: &str = "2 memory";
const S: &str = "3 submit latency";
const H: &str = "6 harvest bytes";

pub const SRC: &str = "bench-src";
pub const VALID: &str = "input-200mb.jsonl";
pub const BIG: &str = "input-1gb.jsonl";
const INPUT: &str = "input.jsonl";

/// Uploads the generated inputs once; every run copies them server-side.
pub async fn upload_inputs(stack: &Stack, inputs: &Inputs, rep: &mut Report) -> Result<()> {
    stack.store.ensure_container(SRC).await?;
    let t0 = Instant::now();
    let (_, n) = stack::upload_file(&stack.store, SRC, VALID, &inputs.valid).await?;
    let up = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let (_, big) = stack::upload_file(&stack.store, SRC, BIG, &inputs.big).await?;
    let up_big = t0.elapsed().as_secs_f64();
    rep.info(
        S,
        "upload 200 MB into Azurite (BlobWriter, 4 MiB blocks), for reference",
        format!("{} ({:.0} MB/s)", secs(up), n as f64 / up / 1e6),
        String::new(),
    );
    rep.info(
        S,
        "upload the 1 GB input into Azurite the same way, for reference (staging a split input writes as much)",
        format!("{} ({:.0} MB/s)", secs(up_big), big as f64 / up_big / 1e6),
        String::new(),
    );
    Ok(())
}

/// Uploads the 200 MB input alone (`--only harvest`: the harvest runs need no other).
pub async fn upload_valid(stack: &Stack, inputs: &Inputs) -> Result<()> {
    stack.store.ensure_container(SRC).await?;
    stack::upload_file(&stack.store, SRC, VALID, &inputs.valid).await?;
    Ok(())
}

/// A copy of a source input in `c.input`, as `input.jsonl`; returns (url, etag, size).
async fn place_input(stack: &Stack, c: &Containers, src: &str) -> Result<(String, String, u64)> {
    c.create(&stack.store).await?;
    stack.store.copy(SRC, src, &c.input, INPUT).await?;
    let info = stack
        .store
        .properties(&c.input, INPUT)
        .await?
        .context("copied input not found")?;
    Ok((stack.store.blob_url(&c.input, INPUT), info.etag, info.size))
}

/// Deletes every blob of the run's containers (Azurite keeps them in memory).
pub async fn clear(stack: &Stack, c: &Containers) -> Result<()> {
    for container in [&c.input, &c.output, &c.state] {
        let names: Vec<String> = stack
            .store
            .list(container, "")
            .map(|b| b.map(|b| b.name))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        for n in names {
            stack.store.delete(container, &n, None).await?;
        }
    }
    Ok(())
}

pub async fn download_baseline(cfg: &Config, stack: &Stack, rep: &mut Report) -> Result<f64> {
    eprintln!(
        "\n== 3. bare download of the 200 MB blob, {} runs",
        cfg.runs
    );
    let (mut sdk, mut raw) = (vec![], vec![]);
    let conn = aoai_blob_batch::storage::ConnectionString::parse(&stack::connection_string(
        stack.azurite.port,
    ))?;
    let http = reqwest::Client::new();
    // (The `BlobInfo::size` that `download` returns is the first range's length, 1 MiB.)
    let size = stack
        .store
        .properties(SRC, VALID)
        .await?
        .context("the uploaded input is missing")?
        .size;
    for _ in 0..cfg.runs {
        let t0 = Instant::now();
        let (_, mut body) = stack.store.download(SRC, VALID, None).await?;
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            n += chunk?.len() as u64;
        }
        if n != size {
            bail!("downloaded {n} of {size} bytes");
        }
        sdk.push(t0.elapsed().as_secs_f64());

        let url = format!(
            "{}?{}",
            stack.store.blob_url(SRC, VALID),
            conn.account_sas(Duration::from_secs(3600))?
        );
        let t0 = Instant::now();
        let resp = http
            .get(url)
            .header("x-ms-version", "2022-11-02")
            .send()
            .await?
            .error_for_status()?;
        let mut body = resp.bytes_stream();
        let mut m = 0u64;
        while let Some(chunk) = body.next().await {
            m += chunk?.len() as u64;
        }
        if m != n {
            bail!("single GET read {m} of {n} bytes");
        }
        raw.push(t0.elapsed().as_secs_f64());
    }
    rep.info(
        S,
        "bare download of the 200 MB blob, same SDK and options as the handler (1 MiB ranges, one at a time)",
        secs(median(&sdk)),
        format!("runs: {}", list(&sdk, secs)),
    );
    rep.info(
        S,
        "bare download, one plain GET (reqwest), for reference",
        secs(median(&raw)),
        format!("runs: {}", list(&raw, secs)),
    );
    Ok(median(&sdk))
}

/// 3 and 2b: a valid 200 MB input, event → batch created, each run a fresh handler and
/// fresh containers; the create call goes through a recording proxy to time the emulator's
/// share (it reads the whole input synchronously, which Azure does not).
pub async fn submit_valid(
    cfg: &Config,
    stack: &Stack,
    download: f64,
    rep: &mut Report,
) -> Result<()> {
    eprintln!(
        "\n== 3. submit: 200 MB valid input, event → batch created, {} runs",
        cfg.runs
    );
    let proxy = Proxy::start(&stack.slow.endpoint(), Duration::ZERO).await?;
    let (mut total, mut create, mut own, mut rss) = (vec![], vec![], vec![], vec![]);
    for r in 0..cfg.runs {
        let c = Containers::named(&format!("s200-{r}"));
        let (url, etag, size) = place_input(stack, &c, VALID).await?;
        let h = Handler::start(
            &cfg.bins.handler,
            &proxy.url(),
            stack.azurite.port,
            &c,
            cfg.work.join(format!("handler-s200-{r}.log")),
        )?;
        proxy.take();
        let (status, logs, t) = h.event(&url, &etag, size).await?;
        if status != 200 || batch_id_in(&logs).is_none() {
            bail!("submit did not create a batch: HTTP {status}: {logs:?}");
        }
        let peak = h.proc.peak_rss()? as f64;
        drop(h);
        let c_secs: f64 = proxy
            .take()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/batches"))
            .map(|r| r.secs)
            .sum();
        eprintln!(
            "  run {}: {:.3} s total, emulator create {:.3} s, peak RSS {}",
            r + 1,
            t,
            c_secs,
            mb(peak)
        );
        total.push(t);
        create.push(c_secs);
        own.push(t - c_secs);
        rss.push(peak);
        clear(stack, &c).await?;
    }
    let ratio = median(&own) / download;
    rep.row(
        S,
        "event → batch created, 200 MB: the handler's part (total minus the emulator's create call) vs bare download",
        "≤ 1.3× download",
        format!("{} vs {}", secs(median(&own)), secs(download)),
        format!("{ratio:.2}×"),
        verdict(ratio <= 1.3),
        format!("runs: {}", list(&own, secs)),
    );
    rep.info(
        S,
        "event → batch created, 200 MB, total as measured (includes the emulator's synchronous read of the input at create)",
        format!(
            "{} ({:.2}× download)",
            secs(median(&total)),
            median(&total) / download
        ),
        format!(
            "runs: {}; emulator create call: {}",
            list(&total, secs),
            list(&create, secs)
        ),
    );
    let peak = median(&rss);
    rep.row(
        M,
        "peak RSS, submit: valid 200 MB blob, event → batch created (fresh handler)",
        "≤ 64 MB",
        mb(peak),
        format!("{:.2} of goal", peak / 64e6),
        verdict(peak <= 64e6),
        format!("runs: {}", list(&rss, mb)),
    );
    Ok(())
}

/// The trigger's answer for a split input: `… split into N parts, M submitted now …` → (N, M).
pub fn split_counts(logs: &[String]) -> Option<(usize, usize)> {
    logs.iter().find_map(|l| {
        let rest = &l[l.find("split into ")? + "split into ".len()..];
        let (parts, rest) = rest.split_once(" parts, ")?;
        let (started, _) = rest.split_once(" submitted now")?;
        Some((parts.parse().ok()?, started.parse().ok()?))
    })
}

/// The staged parts of the run's input: `batch-jobs/staging/{job key}/part-NNNN.jsonl` in
/// the state container, as (name, size).
async fn staged_parts(stack: &Stack, c: &Containers) -> Result<Vec<(String, u64)>> {
    let blobs: Vec<_> = stack
        .store
        .list(&c.state, "staging/")
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    Ok(blobs
        .into_iter()
        .filter(|b| {
            b.name
                .rsplit('/')
                .next()
                .is_some_and(|f| f.starts_with("part-") && f.ends_with(".jsonl"))
        })
        .map(|b| (b.name, b.size))
        .collect())
}

/// 2b: the 1 GB / 500,000-line blob through intake. It is beyond one batch's limits, so the
/// handler streams it from Azurite and validates it, streams it again to stage its parts
/// (whole lines, each within the limits) in the state container, and submits each part as its
/// own batch. The create calls go through a recording proxy, as in `submit_valid`, to tell
/// the emulator's share (it reads each part synchronously at create, which Azure does not)
/// from the handler's. With `--scale` below 1 (`--quick`) the input is smaller than the
/// limits, so the handler gets `BATCH_SPLIT_MAX_REQUESTS` scaled the same way, and still splits it.
pub async fn submit_big(
    cfg: &Config,
    stack: &Stack,
    inputs: &Inputs,
    rep: &mut Report,
) -> Result<()> {
    let big_bytes = inputs.big_bytes;
    eprintln!(
        "\n== 2b. submit memory: {} ({} lines) through intake: validated, split, parts submitted; {} runs",
        mb(big_bytes as f64),
        inputs.big_lines,
        cfg.slow_runs
    );
    let mut extra = vec![];
    if inputs.valid_lines < 100_000 {
        extra.push(("BATCH_SPLIT_MAX_REQUESTS", inputs.valid_lines.to_string()));
    }
    let proxy = Proxy::start(&stack.slow.endpoint(), Duration::ZERO).await?;
    let (mut rss, mut total, mut own, mut create, mut cpu) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut counts = (0, 0);
    for r in 0..cfg.slow_runs {
        let c = Containers::named(&format!("s1g-{r}"));
        let (url, etag, size) = place_input(stack, &c, BIG).await?;
        let h = Handler::start_with(
            &cfg.bins.handler,
            &proxy.url(),
            stack.azurite.port,
            &c,
            cfg.work.join(format!("handler-s1g-{r}.log")),
            &extra,
        )?;
        proxy.take();
        let cpu0 = h.proc.cpu_secs()?;
        let (status, logs, t) = h.event(&url, &etag, size).await?;
        let peak = h.proc.peak_rss()? as f64;
        let cpu1 = h.proc.cpu_secs()?;
        let log_text = h.proc.logs();
        drop(h);
        let Some((parts, started)) = split_counts(&logs) else {
            bail!("the big input was not split: HTTP {status}: {logs:?}");
        };
        if status != 200 || parts < 2 || started != parts {
            bail!(
                "the big input was split into {parts} parts but {started} were submitted: HTTP {status}: {logs:?}"
            );
        }
        if !log_text.contains(&format!("split into {parts} parts")) {
            bail!("the handler's log does not say the input was split into {parts} parts");
        }
        let creates: Vec<Record> = proxy
            .take()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/batches"))
            .collect();
        if creates.len() != parts || creates.iter().any(|r| r.status >= 300) {
            bail!(
                "expected {parts} successful create calls, the emulator saw {:?}",
                creates.iter().map(|r| r.status).collect::<Vec<_>>()
            );
        }
        let staged = staged_parts(stack, &c).await?;
        let staged_bytes: u64 = staged.iter().map(|(_, n)| n).sum();
        if staged.len() != parts || staged_bytes != big_bytes {
            bail!(
                "expected {parts} staged parts holding {big_bytes} bytes, found {} holding {staged_bytes}: {:?}",
                staged.len(),
                staged.iter().map(|(n, _)| n).collect::<Vec<_>>()
            );
        }
        let c_secs: f64 = creates.iter().map(|r| r.secs).sum();
        eprintln!(
            "  run {}: split into {parts} parts, {started} submitted; {t:.2} s total, emulator creates {c_secs:.2} s, \
             handler CPU {:.2} s, peak RSS {}",
            r + 1,
            cpu1 - cpu0,
            mb(peak),
        );
        counts = (parts, started);
        rss.push(peak);
        total.push(t);
        create.push(c_secs);
        own.push(t - c_secs);
        cpu.push(cpu1 - cpu0);
        clear(stack, &c).await?;
    }
    let (parts, _) = counts;
    let scaled = if extra.is_empty() {
        String::new()
    } else {
        format!(
            "; BATCH_SPLIT_MAX_REQUESTS={} (scaled down with the input)",
            inputs.valid_lines
        )
    };
    let peak = median(&rss);
    rep.row(
        M,
        &format!(
            "peak RSS, submit: {} / {}-line blob through intake: validated, split into {parts} parts, staged and submitted (fresh handler)",
            mb_or_gb(big_bytes),
            thousands(inputs.big_lines)
        ),
        "≤ 64 MB",
        mb(peak),
        format!("{:.2} of goal", peak / 64e6),
        verdict(peak <= 64e6),
        format!(
            "runs: {}; the handler reads the blob twice (validation pass, staging pass) and writes it once (the parts){scaled}",
            list(&rss, mb),
        ),
    );
    rep.info(
        M,
        &format!(
            "event → split into {parts} parts, staged and submitted: the handler's part (total minus the emulator's {parts} create calls)"
        ),
        format!(
            "{} ({:.0} MB/s of input)",
            secs(median(&own)),
            big_bytes as f64 / median(&own) / 1e6
        ),
        format!(
            "runs: {}; total as measured {} ({:.0} MB/s); emulator create calls {}; handler CPU {}",
            list(&own, secs),
            list(&total, secs),
            big_bytes as f64 / median(&total) / 1e6,
            list(&create, secs),
            list(&cpu, secs)
        ),
    );
    Ok(())
}

/// 500000 → "500,000".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// "1.02 GB" for the full-size input; the exact size otherwise (`--scale`).
fn mb_or_gb(bytes: u64) -> String {
    if bytes > 900_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        mb(bytes as f64)
    }
}

struct Prepared {
    c: Containers,
    batch: String,
    /// The emulator and the storage port this run's handlers use.
    endpoint: String,
    blob_port: u16,
    proxied: bool,
}

/// 2c and 6: a 100,000-line batch completed by the emulator, harvested by one timer tick of a
/// fresh handler. The last run goes through a recording proxy to Azurite, which tells the
/// move's bytes from the merged build's. That run has its own emulator, also behind the proxy:
/// the handler only moves files the service wrote into *its* storage endpoint.
pub async fn harvest(cfg: &Config, stack: &Stack, rep: &mut Report) -> Result<()> {
    let runs = cfg.slow_runs + 1;
    eprintln!(
        "\n== 2c/6. harvest: {} runs of a 100k-line result (the last one through a recording proxy)",
        runs
    );
    let proxy = Proxy::start(
        &format!("http://127.0.0.1:{}", stack.azurite.port),
        Duration::ZERO,
    )
    .await?;
    let proxied_emulator = stack::start_emulator(
        &cfg.bins.emulator,
        proxy.port,
        500,
        cfg.work.join("emulator-proxied.log"),
    )?;
    let mut prepared = vec![];
    for r in 0..runs {
        let proxied = r + 1 == runs;
        let (endpoint, blob_port) = if proxied {
            (proxied_emulator.endpoint(), proxy.port)
        } else {
            (stack.fast.endpoint(), stack.azurite.port)
        };
        let c = Containers::named(&format!("hv-{r}"));
        let (_, etag, size) = place_input(stack, &c, VALID).await?;
        // The URL as this run's handler sees it (the proxy's, for the proxied run).
        let url = stack::store(blob_port)?.blob_url(&c.input, INPUT);
        let h = Handler::start(
            &cfg.bins.handler,
            &endpoint,
            blob_port,
            &c,
            cfg.work.join(format!("handler-hv-submit-{r}.log")),
        )?;
        let (status, logs, _) = h.event(&url, &etag, size).await?;
        let batch = batch_id_in(&logs)
            .with_context(|| format!("submit did not create a batch: HTTP {status}: {logs:?}"))?;
        prepared.push(Prepared {
            c,
            batch,
            endpoint,
            blob_port,
            proxied,
        });
    }
    let t0 = Instant::now();
    for p in &prepared {
        let client = stack::batch_client(&p.endpoint)?;
        let status = wait_batch_end(&client, &p.batch, Duration::from_secs(1200)).await?;
        if status != "completed" {
            bail!("batch {} ended {status}", p.batch);
        }
    }
    eprintln!(
        "  the emulator completed {runs} batches in {:.0} s",
        t0.elapsed().as_secs_f64()
    );

    let (mut t, mut rss, mut rchar, mut of_results, mut cpu) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut sizes = (0u64, 0u64, 0u64);
    for (r, p) in prepared.iter().enumerate() {
        let batch = stack::batch_client(&p.endpoint)?.retrieve(&p.batch).await?;
        let h = Handler::start(
            &cfg.bins.handler,
            &p.endpoint,
            p.blob_port,
            &p.c,
            cfg.work.join(format!("handler-hv-tick-{r}.log")),
        )?;
        proxy.take();
        let io0 = h.proc.io()?;
        let cpu0 = h.proc.cpu_secs()?;
        let (status, logs, secs_taken) = h.tick().await?;
        let cpu1 = h.proc.cpu_secs()?;
        let io1 = h.proc.io()?;
        let peak = h.proc.peak_rss()? as f64;
        drop(h);
        let records = proxy.take();
        if status != 200 || !logs.iter().any(|l| l.contains("results in")) {
            bail!("the tick did not harvest: HTTP {status}: {logs:?}");
        }
        let out = &p.c.output;
        let size_of = |name: &'static str| {
            let store = &stack.store;
            async move {
                Ok::<u64, anyhow::Error>(
                    store
                        .properties(out, &format!("input/{name}"))
                        .await?
                        .map_or(0, |b| b.size),
                )
            }
        };
        let results = size_of("results.jsonl").await?;
        let errors = size_of("errors.jsonl").await?;
        let merged = size_of("merged.jsonl").await?;
        let summary: serde_json::Value = serde_json::from_slice(
            &stack
                .store
                .read(out, "input/summary.json")
                .await?
                .context("no summary.json")?
                .0,
        )?;
        if summary["status"] != "completed"
            || summary["request_counts"]["total"] == 0
            || summary["request_counts"]["completed"] != summary["request_counts"]["total"]
            || results == 0
        {
            bail!("unexpected harvest: results.jsonl {results} bytes, summary {summary}");
        }
        sizes = (results, errors, merged);
        let read = io1.rchar - io0.rchar;
        eprintln!(
            "  run {}{}: tick {:.2} s, handler CPU {:.2} s, peak RSS {}, rchar {}, results.jsonl {}, merged.jsonl {}",
            r + 1,
            if p.proxied { " (proxied)" } else { "" },
            secs_taken,
            cpu1 - cpu0,
            mb(peak),
            mb(read as f64),
            mb(results as f64),
            mb(merged as f64)
        );
        if p.proxied {
            let dump: String = records
                .iter()
                .filter_map(|r| serde_json::to_string(r).ok())
                .map(|l| l + "\n")
                .collect();
            std::fs::write(cfg.work.join("harvest-requests.jsonl"), dump)?;
            bytes_report(&records, &batch, out, results, errors, read, rep);
        } else {
            t.push(secs_taken);
            cpu.push(cpu1 - cpu0);
            rss.push(peak);
            rchar.push(read as f64);
            of_results.push(read as f64 / results as f64);
        }
        clear(stack, &p.c).await?;
    }
    let peak = median(&rss);
    rep.row(
        M,
        "peak RSS, harvest: one timer tick moving a 100k-line result and building merged.jsonl (fresh handler)",
        "≤ 128 MB",
        mb(peak),
        format!("{:.2} of goal", peak / 128e6),
        verdict(peak <= 128e6),
        format!(
            "runs: {}; results.jsonl {}, merged.jsonl {}, errors.jsonl {}",
            list(&rss, mb),
            mb(sizes.0 as f64),
            mb(sizes.2 as f64),
            mb(sizes.1 as f64)
        ),
    );
    rep.info(
        M,
        "harvest tick duration (100k lines: move + merged.jsonl + summary)",
        secs(median(&t)),
        format!("runs: {}", list(&t, secs)),
    );
    rep.info(
        M,
        "harvest tick: the handler's CPU time (user + system)",
        secs(median(&cpu)),
        format!("runs: {}", list(&cpu, secs)),
    );
    rep.info(
        H,
        "handler's rchar during the harvest tick vs results.jsonl (read/pread: its spool file; socket recv is not counted)",
        format!(
            "{} ({:.2}× results.jsonl)",
            mb(median(&rchar)),
            median(&of_results)
        ),
        format!("runs: {}", list(&rchar, mb)),
    );
    Ok(())
}

/// Sorts the proxied harvest's requests into the move of the service's files and the rest.
fn bytes_report(
    records: &[Record],
    batch: &aoai_blob_batch::openai::Batch,
    out: &str,
    results: u64,
    errors: u64,
    rchar: u64,
    rep: &mut Report,
) {
    // The service's files: `{output container}/{GUID}/results.jsonl` (and errors.jsonl).
    let sources: Vec<String> = [batch.output_blob.as_deref(), batch.error_blob.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(|u| url::Url::parse(u).ok().map(|u| u.path().to_string()))
        .collect();
    let dest = |f: &str| format!("/devstoreaccount1/{out}/input/{f}");
    let is_source = |r: &Record| sources.iter().any(|s| &r.path == s);
    let is_dest = |r: &Record| r.path == dest("results.jsonl") || r.path == dest("errors.jsonl");
    // The move: everything sent to or received from the service's files, plus bodies written
    // to the destinations (a download-and-reupload would show up here).
    let moved_in: u64 = records
        .iter()
        .filter(|r| is_source(r))
        .map(|r| r.response_bytes)
        .sum();
    let moved_out: u64 = records
        .iter()
        .filter(|r| is_source(r) || (is_dest(r) && r.method == "PUT"))
        .map(|r| r.request_bytes)
        .sum();
    let copies = records
        .iter()
        .filter(|r| is_dest(r) && r.method == "PUT")
        .count();
    let merged_read: u64 = records
        .iter()
        .filter(|r| is_dest(r) && r.method == "GET" && r.status < 300)
        .map(|r| r.response_bytes)
        .sum();
    let input_read: u64 = records
        .iter()
        .filter(|r| r.path.ends_with("-in/input.jsonl") && r.method == "GET" && r.status < 300)
        .map(|r| r.response_bytes)
        .sum();
    let merged_written: u64 = records
        .iter()
        .filter(|r| r.path == dest("merged.jsonl") && r.method == "PUT")
        .map(|r| r.request_bytes)
        .sum();
    let total_in: u64 = records.iter().map(|r| r.response_bytes).sum();
    let other_in = total_in - moved_in - merged_read - input_read;
    let raw = moved_in + moved_out;
    rep.row(
        H,
        "raw output bytes through the handler while moving results.jsonl + errors.jsonl",
        "0 (server-side copy)",
        format!("{raw} B"),
        format!(
            "{:.4} of results.jsonl ({})",
            raw as f64 / results.max(1) as f64,
            mb(results as f64)
        ),
        verdict(raw == 0),
        format!(
            "{} requests on the service's files, {copies} copy requests, bytes received {moved_in}, sent {moved_out}",
            records.iter().filter(|r| is_source(r)).count()
        ),
    );
    rep.row(
        H,
        "building merged.jsonl: results read through the handler (by design, once)",
        "= 1× results",
        mb(merged_read as f64),
        format!(
            "{:.3}× results.jsonl + errors.jsonl",
            merged_read as f64 / (results + errors).max(1) as f64
        ),
        verdict(merged_read <= results + errors),
        format!(
            "input read {} (its size once), merged.jsonl written {}, everything else received {} (job records, listings); rchar (spool file reads) {}",
            mb(input_read as f64),
            mb(merged_written as f64),
            mb(other_in as f64),
            mb(rchar as f64)
        ),
    );
}
