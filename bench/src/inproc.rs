//! `bench inproc MODE FILE`: one in-process measurement over a file, timed inside the process
//! (start-up excluded), printed as one JSON line. Run as a child so that each measurement has
//! its own peak RSS and a cold heap.
//!
//! - `validator`: `validate::validate_reader`, as `handler validate` calls it (a reader thread
//!   and a checking thread);
//! - `feed`: `Validator::feed` over 1 MiB reads on one thread (checking alone, no overlap);
//! - `floor`: the same 1 MiB reads, counting newlines with memchr: the least any line-based
//!   validator must do.

use std::{fs::File, io::Read, path::Path, time::Instant};

use anyhow::Result;
use aoai_blob_batch::validate::{Limits, Validator, validate_reader};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Validator,
    Feed,
    Floor,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub secs: f64,
    pub bytes: u64,
    pub lines: u64,
    pub ok: bool,
    /// The estimated input tokens (0 for the floor): the same whatever the mode.
    #[serde(default)]
    pub tokens: u64,
}

fn read_chunk(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match f.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

pub fn run(mode: Mode, path: &Path) -> Result<Outcome> {
    let mut file = File::open(path)?;
    let t0 = Instant::now();
    let outcome = match mode {
        Mode::Validator => {
            let report = validate_reader(file, Limits::default())?;
            Outcome {
                secs: 0.0,
                bytes: report.bytes,
                lines: report.lines,
                ok: report.is_ok(),
                tokens: report.tokens,
            }
        }
        Mode::Feed => {
            let mut v = Validator::new(Limits::default());
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match read_chunk(&mut file, &mut buf)? {
                    0 => break,
                    n => v.feed(&buf[..n]),
                }
            }
            let report = v.finish();
            Outcome {
                secs: 0.0,
                bytes: report.bytes,
                lines: report.lines,
                ok: report.is_ok(),
                tokens: report.tokens,
            }
        }
        Mode::Floor => {
            let mut buf = vec![0u8; 1 << 20];
            let (mut bytes, mut lines) = (0u64, 0u64);
            loop {
                match read_chunk(&mut file, &mut buf)? {
                    0 => break,
                    n => {
                        bytes += n as u64;
                        lines += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
                    }
                }
            }
            Outcome {
                secs: 0.0,
                bytes,
                lines,
                ok: true,
                tokens: 0,
            }
        }
    };
    Ok(Outcome {
        secs: t0.elapsed().as_secs_f64(),
        ..outcome
    })
}
