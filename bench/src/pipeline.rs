//! Through Azurite and the emulator: 3. submit latency against a bare download, 2b. submit
//! memory (1 GB and 200 MB), 2c. harvest memory and time, 6. bytes through the handler.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;

use crate::{
    Config, Inputs, Stack,
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
    stack::upload_file(&stack.store, SRC, BIG, &inputs.big).await?;
    rep.info(
        S,
        "upload 200 MB into Azurite (BlobWriter, 4 MiB blocks), for reference",
        format!("{} ({:.0} MB/s)", secs(up), n as f64 / up / 1e6),
        String::new(),
    );
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
        let peak = h.svc.peak_rss()? as f64;
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

/// 2b: a 1 GB blob through intake: streamed from Azurite, validated, rejected.
pub async fn submit_big(
    cfg: &Config,
    stack: &Stack,
    big_bytes: u64,
    rep: &mut Report,
) -> Result<()> {
    eprintln!(
        "\n== 2b. submit memory: {} blob through intake, {} runs",
        mb(big_bytes as f64),
        cfg.slow_runs
    );
    let (mut rss, mut t) = (vec![], vec![]);
    for r in 0..cfg.slow_runs {
        let c = Containers::named(&format!("s1g-{r}"));
        let (url, etag, size) = place_input(stack, &c, BIG).await?;
        let h = Handler::start(
            &cfg.bins.handler,
            &stack.slow.endpoint(),
            stack.azurite.port,
            &c,
            cfg.work.join(format!("handler-s1g-{r}.log")),
        )?;
        let (status, logs, secs_taken) = h.event(&url, &etag, size).await?;
        let rejected = logs.iter().any(|l| l.contains("rejected"));
        if status != 200 || (big_bytes > 200 * 1024 * 1024 && !rejected) {
            bail!("the big input was not rejected: HTTP {status}: {logs:?}");
        }
        let peak = h.svc.peak_rss()? as f64;
        eprintln!(
            "  run {}: {:.2} s, peak RSS {}",
            r + 1,
            secs_taken,
            mb(peak)
        );
        drop(h);
        if big_bytes > 200 * 1024 * 1024 {
            let summary = stack
                .store
                .read(&c.output, "input/summary.json")
                .await?
                .context("no summary.json for the rejected input")?;
            let v: serde_json::Value = serde_json::from_slice(&summary.0)?;
            let codes: Vec<&str> = v["problems"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p["code"].as_str()).collect())
                .unwrap_or_default();
            if !codes.contains(&"file_too_large") || v["request_counts"]["total"] == 0 {
                bail!("unexpected summary for the big input: {v}");
            }
        }
        rss.push(peak);
        t.push(secs_taken);
        clear(stack, &c).await?;
    }
    let peak = median(&rss);
    rep.row(
        M,
        "peak RSS, submit: 1 GB blob streamed from Azurite through intake (rejected: file_too_large, too_many_tasks)",
        "≤ 64 MB",
        mb(peak),
        format!("{:.2} of goal", peak / 64e6),
        verdict(peak <= 64e6),
        format!(
            "runs: {}; event → rejected in {} ({:.0} MB/s)",
            list(&rss, mb),
            list(&t, secs),
            big_bytes as f64 / median(&t) / 1e6
        ),
    );
    Ok(())
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
    let proxied_emulator = stack::Emulator::start(
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

    let (mut t, mut rss, mut rchar, mut of_results) = (vec![], vec![], vec![], vec![]);
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
        let io0 = h.svc.io()?;
        let (status, logs, secs_taken) = h.tick().await?;
        let io1 = h.svc.io()?;
        let peak = h.svc.peak_rss()? as f64;
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
            "  run {}{}: tick {:.2} s, peak RSS {}, rchar {}, results.jsonl {}, merged.jsonl {}",
            r + 1,
            if p.proxied { " (proxied)" } else { "" },
            secs_taken,
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
