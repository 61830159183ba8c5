//! Azure OpenAI Batch from Blob Storage, as an Azure Functions custom handler.
//!
//! Host payloads (`protocol`) and routes (`server`) sit apart from the core (`submit`,
//! `poll`, `harvest`, `split`, `validate`, `jobs`), so the core could run under another trigger source.

pub mod app;
pub mod config;
pub mod harvest;
pub mod jobs;
pub mod openai;
pub mod poll;
pub mod protocol;
pub mod server;
pub mod split;
pub mod storage;
pub mod submit;
pub mod summary;
pub mod validate;
