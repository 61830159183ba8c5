//! Results: one row per measurement with its goal, the median measured, the ratio the goal
//! is about, and a verdict; printed as a table and written as Markdown and JSON.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Section, e.g. "1 validation".
    pub group: String,
    pub what: String,
    pub goal: String,
    pub measured: String,
    pub ratio: String,
    /// "pass", "MISS", or "info" (context, no goal).
    pub verdict: String,
    /// How it was measured: runs, the individual values.
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

pub fn verdict(ok: bool) -> String {
    if ok { "pass" } else { "MISS" }.to_string()
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        group: &str,
        what: &str,
        goal: &str,
        measured: String,
        ratio: String,
        verdict: String,
        detail: String,
    ) {
        let row = Row {
            group: group.into(),
            what: what.into(),
            goal: goal.into(),
            measured,
            ratio,
            verdict,
            detail,
        };
        eprintln!(
            "  [{}] {}: {} ({}) {}",
            row.verdict, row.what, row.measured, row.ratio, row.detail
        );
        self.rows.push(row);
    }

    pub fn info(&mut self, group: &str, what: &str, measured: String, detail: String) {
        self.row(
            group,
            what,
            "",
            measured,
            String::new(),
            "info".into(),
            detail,
        );
    }

    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("  note: {text}");
        self.notes.push(text);
    }

    /// A plain-text table for the terminal.
    pub fn text(&self) -> String {
        let head = ["what", "goal", "measured", "ratio", "verdict"];
        let cells: Vec<[&str; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.what.as_str(),
                    r.goal.as_str(),
                    r.measured.as_str(),
                    r.ratio.as_str(),
                    r.verdict.as_str(),
                ]
            })
            .collect();
        let width = |i: usize| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        };
        let w: Vec<usize> = (0..5).map(width).collect();
        let fmt = |c: [&str; 5]| {
            let mut s = String::new();
            for i in 0..5 {
                let pad = w[i] - c[i].chars().count();
                s.push_str(c[i]);
                if i < 4 {
                    s.push_str(&" ".repeat(pad + 2));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = String::new();
        out.push_str(&fmt(head));
        out.push('\n');
        out.push_str(&"-".repeat(w.iter().sum::<usize>() + 8));
        out.push('\n');
        let mut group = "";
        for (r, c) in self.rows.iter().zip(&cells) {
            if r.group != group {
                group = &r.group;
                out.push_str(&format!("[{group}]\n"));
            }
            out.push_str(&fmt(*c));
            out.push('\n');
        }
        out
    }

    /// Markdown: the machine, the table, the details and notes.
    pub fn markdown(&self) -> String {
        let esc = |s: &str| s.replace('|', "\\|");
        let mut out = String::new();
        out.push_str(
            "| | what | goal | measured (median) | ratio | verdict |\n|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                esc(&r.group),
                esc(&r.what),
                esc(&r.goal),
                esc(&r.measured),
                esc(&r.ratio),
                if r.verdict == "MISS" {
                    "**MISS**".to_string()
                } else {
                    r.verdict.clone()
                }
            ));
        }
        out.push_str("\n**Machine**\n\n");
        for (k, v) in &self.machine {
            out.push_str(&format!("- {k}: {v}\n"));
        }
        out.push_str("\n**Details** (every run)\n\n");
        for r in &self.rows {
            if !r.detail.is_empty() {
                out.push_str(&format!("- {}: {}\n", r.what, r.detail));
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\n**Notes**\n\n");
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

pub fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

pub fn list(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}
