//! Arbitrary bytes as the Functions host's payload to `function-trigger`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| aoai_blob_batch_fuzz::event_decoder(data));
