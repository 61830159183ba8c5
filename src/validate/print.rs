//! [`print_report`]: the report as `handler validate` prints it, one line per problem, then
//! a count of those not listed, then a one-line verdict.

use super::{Encoding, Report};

/// Prints one line per problem (`line N: code: message`, or `file: code: message`), then a
/// count of those not listed, then a one-line verdict. Write errors (a closed pipe) are
/// ignored: the exit code carries the verdict anyway.
pub fn print_report(report: &Report, out: &mut impl std::io::Write) {
    let _ = write_report(report, out);
}

fn write_report(report: &Report, out: &mut impl std::io::Write) -> std::io::Result<()> {
    for p in &report.problems {
        match p.line {
            Some(n) => writeln!(out, "line {n}: {}: {}", p.code, p.message)?,
            None => writeln!(out, "file: {}: {}", p.code, p.message)?,
        }
    }
    if report.more_problems > 0 {
        writeln!(
            out,
            "... and {} more {}",
            report.more_problems,
            plural(report.more_problems, "problem")
        )?;
    }
    if let Some(warning) = report.model.as_deref().and_then(model_warning) {
        writeln!(out, "warning: {warning}")?;
    }
    if report.is_ok() {
        writeln!(
            out,
            "OK: {} {}, url {}, model {}, {} estimated input tokens ({})",
            report.lines,
            plural(report.lines, "request"),
            report.url.as_deref().unwrap_or("-"),
            report.model.as_deref().unwrap_or("-"),
            report.tokens,
            report.encoding.map_or("-", Encoding::name),
        )
    } else {
        let total = report.problems.len() as u64 + report.more_problems;
        writeln!(
            out,
            "REJECTED: {total} {} ({} request {}, {} bytes)",
            plural(total, "problem"),
            report.lines,
            plural(report.lines, "line"),
            report.bytes,
        )
    }
}

/// A warning when `body.model` is a placeholder, or looks like a model's name where the
/// service wants a deployment's: the file is valid, but the batch would fail with
/// `model_not_found` unless a deployment is really named so.
pub fn model_warning(model: &str) -> Option<String> {
    let lower = model.to_ascii_lowercase();
    if lower.contains("replace-with") || lower.contains("your-deployment") || model.contains('<') {
        return Some(format!(
            "body.model is the placeholder `{model}`: replace it with the name of your batch \
             deployment (GlobalBatch or DataZoneBatch) before uploading"
        ));
    }
    let o_series = lower.len() > 1
        && lower.starts_with('o')
        && lower[1..].starts_with(|c: char| c.is_ascii_digit());
    // A name that says it is a deployment (`gpt-4o-mini-batch`, infra/'s default) is one.
    let says_deployment = lower.contains("batch") || lower.contains("deploy");
    let model_like =
        (lower.starts_with("gpt-") || lower.starts_with("text-embedding-") || o_series)
            && !says_deployment;
    model_like.then(|| {
        format!(
            "body.model `{model}` looks like a model's name; the service wants the name of a \
             batch deployment (GlobalBatch or DataZoneBatch) of your resource, and answers \
             model_not_found otherwise. Ignore this if your deployment is named so."
        )
    })
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{
        Limits,
        test_support::{check, check_with, file},
    };

    #[test]
    fn print_report_formats() {
        let mut out = Vec::new();
        print_report(&check(file(&["a", "b", "c"])), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "OK: 3 requests, url /chat/completions, model dep, 27 estimated input tokens (o200k_base)\n"
        );

        let limits = Limits {
            max_problems: 1,
            ..Limits::default()
        };
        let mut out = Vec::new();
        print_report(&check_with(file(&["a", "a", "a"]), limits), &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("line 2: duplicate_custom_id: "),
            "{text}"
        );
        assert_eq!(lines[1], "... and 1 more problem");
        assert!(lines[2].starts_with("REJECTED: 2 problems"), "{text}");

        let mut out = Vec::new();
        print_report(&check(""), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("file: empty_file: "), "{text}");
        assert!(text.contains("REJECTED: 1 problem "), "{text}");
    }

    #[test]
    fn placeholders_and_model_names_are_warned_about_deployment_names_are_not() {
        let placeholder = model_warning("REPLACE-WITH-MODEL-DEPLOYMENT-NAME").unwrap();
        assert!(placeholder.contains("placeholder"), "{placeholder}");
        for model in [
            "gpt-4o-mini",
            "GPT-4.1",
            "o3-mini",
            "o1",
            "text-embedding-3-small",
        ] {
            let w = model_warning(model).unwrap_or_else(|| panic!("{model}"));
            assert!(w.contains("looks like a model's name"), "{w}");
        }
        for deployment in [
            "my-batch",
            "batch-gpt4o",
            "prod_summaries",
            "o",
            "openai-batch",
            "gpt-4o-mini-batch",
        ] {
            assert_eq!(model_warning(deployment), None, "{deployment}");
        }
    }
}
