//! The timer's sweep of the input container, a window at a time: which names a tick lists, which
//! names that listing speaks for, and how the sweep's mark moves.
//!
//! Listing a container costs a request per 5,000 names, and inputs stay in `batch-input` after
//! their results are in: with its history growing, one listing per tick would make every tick
//! slower (a million inputs: 200 requests, tens of seconds against Azure). So a tick lists at
//! most `BATCH_SWEEP_INPUTS_PER_TICK` names (20,000 by default), from where the last tick left
//! off (storage's continuation marker, kept in `sweep.json`), and a cycle of ticks covers the
//! container; a container within one window is listed whole every tick, as before.
//!
//! What a window's listing says: an input in it with no job was missed (its event lost); an
//! active job whose input name falls in the window's range of names (after the last name of the
//! cycle's previous window, up to its own last name, or to the end for the cycle's last window)
//! but is not in it was deleted. Names are compared as storage orders them (UTF-16 code units,
//! ordinal), so the range test agrees with the listing's order for any name.
//!
//! The mark (every input modified before it was looked at) moves only when a cycle ends with
//! every input it found taken in, to the newest Last-Modified the cycle saw but never past the
//! cycle's start: an input uploaded mid-cycle into a range already listed has a Last-Modified
//! after the start, so the next cycle looks at it.
//!
//! Below the workflows: `poll` lists a window and takes in what it found; this module calls no
//! workflow.

use std::cmp::Ordering;

use crate::{
    app::App,
    jobs::SweepState,
    storage::{BlobInfo, StorageError},
};

/// One tick's listing of the input container.
#[derive(Debug, Default)]
pub struct InputWindow {
    pub inputs: Vec<BlobInfo>,
    /// The names it covers start after this one (`None`: from the first).
    after: Option<String>,
    /// The last name listed (`None`: none was).
    last: Option<String>,
    /// Where the next window goes on; `None`: this window ended the cycle.
    next: Option<String>,
    /// This window began a cycle.
    starts_cycle: bool,
}

impl InputWindow {
    /// Lists the next window: up to `per_tick` names from where `state` left off.
    pub async fn list(
        app: &App,
        state: &SweepState,
        per_tick: u32,
    ) -> Result<InputWindow, StorageError> {
        let mut cursor = state.cursor.clone();
        let starts_cycle = cursor.is_none();
        let mut inputs: Vec<BlobInfo> = Vec::new();
        // Storage may answer a page with fewer names than asked (even none) and a marker: the
        // pages are bounded too, so a window always ends.
        let mut pages = per_tick.div_ceil(5000) + 2;
        loop {
            pages -= 1;
            let room = per_tick.saturating_sub(inputs.len() as u32).max(1);
            let (page, next) = app
                .store
                .list_page(&app.config.input_container, cursor.take(), room)
                .await?;
            inputs.extend(page);
            cursor = next;
            if cursor.is_none() || inputs.len() as u32 >= per_tick || pages == 0 {
                break;
            }
        }
        Ok(InputWindow {
            last: inputs.last().map(|b| b.name.clone()),
            inputs,
            after: if starts_cycle {
                None
            } else {
                state.after.clone()
            },
            next: cursor,
            starts_cycle,
        })
    }

    /// This window ends its cycle: it covers every name after `after`.
    pub fn ends_cycle(&self) -> bool {
        self.next.is_none()
    }

    /// Whether this window's listing speaks for `name`: the name would be in it if it were in
    /// the container.
    pub fn covers(&self, name: &str) -> bool {
        let after_start = self
            .after
            .as_deref()
            .is_none_or(|a| storage_order(name, a) == Ordering::Greater);
        let before_end = self.ends_cycle()
            || self
                .last
                .as_deref()
                .is_some_and(|l| storage_order(name, l) != Ordering::Greater);
        after_start && before_end
    }

    /// `state` after this window was swept: `newest` is the newest Last-Modified among its
    /// inputs, `all_taken` whether every input it took in went through; `now` is when it
    /// was listed.
    pub fn advance(
        &self,
        state: &SweepState,
        newest: Option<i64>,
        all_taken: bool,
        now: i64,
    ) -> SweepState {
        let mut next = state.clone();
        if self.starts_cycle {
            next.cycle_started_at = Some(now);
            next.cycle_newest = None;
            next.cycle_faulted = false;
        }
        next.cycle_newest = next.cycle_newest.max(newest);
        next.cycle_faulted |= !all_taken;
        if self.ends_cycle() {
            if !next.cycle_faulted
                && let Some(newest) = next.cycle_newest
            {
                let until = newest.min(next.cycle_started_at.unwrap_or(newest));
                if next.mark.is_none_or(|m| until > m) {
                    next.mark = Some(until);
                }
            }
            next.cursor = None;
            next.after = None;
            next.cycle_started_at = None;
            next.cycle_newest = None;
            next.cycle_faulted = false;
        } else {
            next.cursor = self.next.clone();
            next.after = self.last.clone().or(next.after);
        }
        next
    }
}

/// Storage's order of blob names: ordinal over UTF-16 code units (it differs from Rust's
/// byte order only for names mixing characters above U+FFFF with ones from U+E000 to U+FFFF).
fn storage_order(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(after: Option<&str>, names: &[&str], next: Option<&str>) -> InputWindow {
        InputWindow {
            inputs: names
                .iter()
                .map(|n| BlobInfo {
                    name: n.to_string(),
                    etag: "e".into(),
                    size: 1,
                    modified: Some(100),
                })
                .collect(),
            after: after.map(str::to_string),
            last: names.last().map(|n| n.to_string()),
            next: next.map(str::to_string),
            starts_cycle: after.is_none(),
        }
    }

    #[test]
    fn a_window_speaks_only_for_its_range_of_names() {
        let first = window(None, &["b.jsonl", "d.jsonl"], Some("m1"));
        assert!(first.covers("a.jsonl"), "before the first name listed");
        assert!(first.covers("c.jsonl"));
        assert!(first.covers("d.jsonl"));
        assert!(
            !first.covers("da.jsonl"),
            "after its last name: the next window's"
        );
        let last = window(Some("d.jsonl"), &["f.jsonl"], None);
        assert!(!last.covers("d.jsonl"));
        assert!(last.covers("da.jsonl"), "between the windows: this one's");
        assert!(
            last.covers("z.jsonl"),
            "the cycle's last window runs to the end"
        );
        let whole = window(None, &[], None);
        assert!(whole.covers("anything.jsonl"), "an empty container");
    }

    #[test]
    fn names_are_ordered_as_storage_orders_them() {
        // U+1F600 (a surrogate pair, 0xD83D…) sorts before U+FF21 in UTF-16 units, after
        // it in UTF-8 bytes: a window ending at the latter covers the former.
        assert_eq!(storage_order("\u{FF21}", "\u{1F600}"), Ordering::Greater);
        assert!("\u{FF21}" < "\u{1F600}", "byte order says the opposite");
        let w = window(None, &["\u{FF21}.jsonl"], Some("m"));
        assert!(w.covers("\u{1F600}.jsonl"));
    }

    #[test]
    fn the_mark_moves_at_a_cycles_end_never_past_its_start() {
        let state = SweepState {
            mark: Some(50),
            ..SweepState::default()
        };
        // A cycle of two windows, begun at 1,000; the newest input it saw, 2,000, came after
        // its start (another clock): the mark stops at the start.
        let first = window(None, &["a.jsonl"], Some("m1"));
        let mid = first.advance(&state, Some(2_000), true, 1_000);
        assert_eq!(mid.mark, Some(50), "not before the cycle ends");
        assert_eq!(mid.cursor.as_deref(), Some("m1"));
        assert_eq!(mid.after.as_deref(), Some("a.jsonl"));
        let last = window(Some("a.jsonl"), &["b.jsonl"], None);
        let end = last.advance(&mid, Some(900), true, 1_100);
        assert_eq!(end.mark, Some(1_000));
        assert_eq!(
            end,
            SweepState {
                mark: Some(1_000),
                ..SweepState::default()
            }
        );
        // A fault anywhere in the cycle keeps the mark.
        let faulted = first.advance(&state, Some(900), false, 1_000);
        let end = last.advance(&faulted, Some(900), true, 1_100);
        assert_eq!(end.mark, Some(50));
        // One window, the usual case: the mark moves to the newest input, as it always did.
        let whole = window(None, &["a.jsonl"], None);
        assert_eq!(
            whole.advance(&state, Some(900), true, 1_000).mark,
            Some(900)
        );
    }
}
