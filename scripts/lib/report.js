// What came back, for people: used by scripts/demo and scripts/smoke (both modes).
//
//   node report.js table SUMMARY MERGED   the answers as a table (custom_id, status, the first
//                                         60 characters of the answer), the summary's counts,
//                                         problems, error codes and notes; exit 0 when the
//                                         status is `completed`, 1 otherwise
//   node report.js cause SUMMARY          one line: the likely cause of a summary that is not
//                                         `completed` (nothing for a completed one)
//   node report.js record RECORD          one line: where a job record (batch-jobs/active/… or
//                                         done/…) stands: state, batch status, counts, last error
//
// SUMMARY and MERGED are files (MERGED may be empty or missing); see README "What happens to a
// file" for their fields.
"use strict";
const fs = require("fs");

const [mode, ...files] = process.argv.slice(2);
const readJson = (path) => JSON.parse(fs.readFileSync(path, "utf8"));
const oneLine = (s, n) => {
  s = String(s ?? "").replace(/\s+/g, " ").trim();
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
};

// Every error code a summary carries: its own, and its parts'.
function codes(summary) {
  const all = [...(summary.errors || []), ...(summary.problems || [])];
  for (const p of summary.parts || []) all.push(...(p.errors || []));
  return [...new Set(all.map((e) => e.code).filter(Boolean))];
}

function table(summaryPath, mergedPath) {
  const summary = readJson(summaryPath);
  let merged = "";
  try {
    merged = fs.readFileSync(mergedPath, "utf8");
  } catch (_) {
    // A rejected input has no merged.jsonl.
  }
  const rows = merged.split("\n").filter((l) => l.trim()).map((l) => {
    const r = JSON.parse(l);
    // The body may sit under `response.body` (the service's output shape) or be `response` itself.
    const body = r.response && (r.response.body || r.response);
    const answer = body && body.choices && body.choices[0] && body.choices[0].message
      ? body.choices[0].message.content
      : r.error ? `error: ${r.error.code || ""} ${r.error.message || JSON.stringify(r.error)}` : "";
    const status = r.status_code ?? (r.response && r.response.status_code) ?? (r.error ? "error" : "");
    return [String(r.custom_id ?? ""), String(status), oneLine(answer, 60)];
  });
  if (rows.length) {
    const head = ["custom_id", "status", "answer (first 60 characters)"];
    const w = [0, 1].map((i) => Math.max(head[i].length, ...rows.map((r) => r[i].length)));
    const fmt = (r) => `${r[0].padEnd(w[0])}  ${r[1].padEnd(w[1])}  ${r[2]}`;
    console.log(fmt(head));
    console.log(fmt(head.map((h, i) => "-".repeat(i < 2 ? w[i] : h.length))));
    rows.forEach((r) => console.log(fmt(r)));
    console.log();
  }
  const c = summary.request_counts || {};
  console.log(`summary: status ${summary.status}, batch ${summary.batch_id ?? "none"}, ` +
    `requests ${c.total ?? "?"} total, ${c.completed ?? "?"} completed, ${c.failed ?? "?"} failed`);
  for (const p of summary.problems || []) console.log(`  line ${p.line}: ${p.code}: ${p.message}`);
  for (const e of summary.errors || []) {
    console.log(`  error: ${e.code || "?"}${e.line ? ` (line ${e.line})` : ""}: ${oneLine(e.message, 200)}`);
  }
  for (const n of summary.notes || []) console.log(`  note: ${n}`);
  return summary.status === "completed" ? 0 : 1;
}

// The likely cause, for the codes a deployment's owner can do something about (README,
// "Troubleshooting", has the full table).
function cause(summaryPath) {
  const s = readJson(summaryPath);
  if (s.status === "completed") return 0;
  const cs = codes(s);
  const has = (c) => cs.includes(c);
  let why;
  if (has("token_limit_exceeded")) {
    why = "quota: the deployment's enqueued-token quota stayed full for every attempt " +
      "(token_limit_exceeded); wait for the jobs ahead of it, or raise the deployment's capacity " +
      "(modelCapacity) within the subscription's Global Batch quota";
  } else if (has("model_not_found")) {
    why = "model_not_found: body.model names no batch deployment of this Azure OpenAI resource; " +
      "it must be the deployment name (deployment output modelDeploymentName)";
  } else if (has("input_no_permissions")) {
    why = "input_no_permissions: the Azure OpenAI resource's own (system-assigned) identity cannot " +
      "read batch-input; its Storage Blob Data Contributor role is missing or not applied yet " +
      "(minutes after a deployment): redeploy infra/, wait a few minutes, run again";
  } else if (has("invalid_request")) {
    why = "invalid_request: the service refused the batch; is the deployment's SKU a batch SKU " +
      "(modelSku GlobalBatch or DataZoneBatch)?";
  } else if (s.status === "rejected") {
    why = `the handler rejected the input before submitting it (${cs.join(", ") || "see problems"})`;
  } else if (s.status === "expired") {
    why = "the batch expired: the service did not finish it within its 24-hour window";
  } else if (s.status === "cancelled") {
    why = "the batch was cancelled (by someone, or by the service)";
  } else {
    why = `the batch ended ${s.status}${cs.length ? ` (${cs.join(", ")})` : ""}; ` +
      "summary.json's errors and notes say more";
  }
  console.log(why);
  return 0;
}

function record(recordPath) {
  const r = readJson(recordPath);
  const parts = [`job ${r.state}${r.outcome ? ` (${r.outcome})` : ""}`];
  if (r.batch_id) {
    const c = r.request_counts;
    parts.push(`batch ${r.batch_status || "?"}${c ? ` ${c.completed ?? 0}/${c.total ?? "?"}` : ""}`);
  }
  if (r.state === "queued") parts.push(`waiting for quota, attempt ${r.quota_attempts ?? "?"}`);
  if (r.last_error) parts.push(`last error: ${oneLine(r.last_error, 80)}`);
  console.log(parts.join(", "));
  return 0;
}

let rc;
try {
  switch (mode) {
    case "table": rc = table(files[0], files[1]); break;
    case "cause": rc = cause(files[0]); break;
    case "record": rc = record(files[0]); break;
    default:
      console.error("usage: report.js table SUMMARY MERGED | cause SUMMARY | record RECORD");
      rc = 2;
  }
} catch (e) {
  console.error(`report.js: ${e.message}`);
  rc = 2;
}
process.exit(rc);
