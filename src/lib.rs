//! Azure OpenAI Batch from Blob Storage, as an Azure Functions custom handler.
//!
//! The modules form a stack; each imports only from the layers below it, never above:
//!
//! ```text
//!  host face     server (routes)  protocol (the host's payloads)     main.rs ──▶ cli (the commands)
//!                   │
//!  workflows     webhook (an event) ──▶ poll (a timer tick) ──▶ harvest ──▶ submit ──▶ split ──▶ outputs
//!                   (each a module of functions taking `&App`; the arrows are who calls whom)
//!                   └────────────────────┴───────────┴──▶ cancel (a leaf: server and cli call it too)
//!                   │
//!  admission     capacity (the ledger per target: room, reservations; `submit`, `poll`,
//!                   │      `harvest` call it)   sweep (the input container a window a tick; `poll`)
//!  context       app (App: settings, clients, clock; Journal; StepError; guarded; fault points)
//!                   │
//!  job model     summary ──▶ status (status.json) ──▶ jobs (records, typed states, their store)
//!                   │
//!  clients and   openai (the batch REST client)   storage (Blob Storage)
//!  pure logic    validate (the input checker)     config (settings)
//!                webhook::signature (the Standard Webhooks check; the one pure part of `webhook`)
//! ```
//!
//! `protocol` and `server` are the only modules that know the Functions host, so the
//! workflows could run under another trigger source. A type two workflows share lives below
//! both (the step error in `app`, harvest progress in `jobs`, usage totals in `summary`).
//! `jobs` is the one place that says which state may follow which: a `Job<S>` carries only
//! its state's data, and a transition from the wrong state does not compile.

pub mod app;
pub mod cancel;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod harvest;
pub mod jobs;
pub mod lease;
pub mod openai;
pub mod outputs;
pub mod poll;
pub mod protocol;
pub mod server;
pub mod split;
pub mod status;
pub mod storage;
pub mod submit;
pub mod summary;
pub mod sweep;
pub mod validate;
pub mod webhook;
