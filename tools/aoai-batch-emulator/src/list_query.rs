//! The classic list's OData query options, `$filter` and `$orderby`.
//!
//! The `2025-04-01-preview` spec (Batch_List in
//! `specification/cognitiveservices/data-plane/AzureOpenAI/authoring/preview/2025-04-01-preview/azureopenai.json`)
//! gives both as "The OData expression to describe the filtering conditions / sorting order";
//! its example (`examples/get_batches.json`) sends
//! `$filter=created_at gt 1646120000 and created_at lt 1646130000 and status eq 'completed'`
//! with `$orderby=created_at asc`, and the batch how-to's "List batch (Preview)" builds
//! `created_at gt 1728860560 and status eq 'Completed'` (status in another case). The emulator
//! takes that language: comparisons of `created_at` with unix seconds and of `status` with a
//! quoted name (any case), joined by `and`. Anything else is a 400 naming the parameter, so a
//! client relying on more learns it here rather than getting an unfiltered list.
//!
//! The v1 list has neither option (only `after` and `limit`), and the emulator ignores them
//! there, as a service does an unknown query parameter.

use crate::batches::Batch;

/// The order of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    NewestFirst,
    OldestFirst,
}

/// `$orderby`: `created_at`, `created_at asc` or `created_at desc`. A bare property sorts
/// ascending, as OData's does: "If the expression includes the optional asc clause or if no
/// option is specified, the entities MUST be returned in ascending order" ([MS-ODATA] $orderby,
/// https://learn.microsoft.com/openspecs/windows_protocols/ms-odata/793b1e83-95ee-4446-8434-f5b634f20d1e).
pub fn parse_orderby(text: &str) -> Result<Order, String> {
    let words: Vec<String> = text
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    match words.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["created_at"] | ["created_at", "asc"] => Ok(Order::OldestFirst),
        ["created_at", "desc"] => Ok(Order::NewestFirst),
        _ => Err(format!(
            "Invalid value for '$orderby': '{text}'. Use 'created_at asc' or 'created_at desc'."
        )),
    }
}

/// A parsed `$filter`: every clause must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    clauses: Vec<Clause>,
}

#[derive(Debug, Clone, PartialEq)]
enum Clause {
    CreatedAt(Cmp, i64),
    /// `eq` (true) or `ne` (false), and the status name in lower case.
    Status(bool, String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

impl Cmp {
    fn parse(word: &str) -> Option<Self> {
        Some(match word.to_ascii_lowercase().as_str() {
            "eq" => Cmp::Eq,
            "ne" => Cmp::Ne,
            "gt" => Cmp::Gt,
            "ge" => Cmp::Ge,
            "lt" => Cmp::Lt,
            "le" => Cmp::Le,
            _ => return None,
        })
    }

    fn holds(self, a: i64, b: i64) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
        }
    }
}

impl Filter {
    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "Invalid value for '$filter': '{text}'. Use comparisons of created_at (eq, ne, gt, \
                 ge, lt, le and unix seconds) and of status (eq or ne and a quoted status), \
                 joined by 'and'."
            )
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() {
            return Ok(Filter::default());
        }
        let mut clauses = Vec::new();
        for clause in words.split(|w| w.eq_ignore_ascii_case("and")) {
            let [property, op, value] = clause else {
                return Err(invalid());
            };
            let cmp = Cmp::parse(op).ok_or_else(invalid)?;
            clauses.push(match property.to_ascii_lowercase().as_str() {
                "created_at" => Clause::CreatedAt(cmp, value.parse().map_err(|_| invalid())?),
                "status" if matches!(cmp, Cmp::Eq | Cmp::Ne) => {
                    let name = value
                        .strip_prefix('\'')
                        .and_then(|v| v.strip_suffix('\''))
                        .filter(|v| !v.is_empty())
                        .ok_or_else(invalid)?;
                    Clause::Status(cmp == Cmp::Eq, name.to_ascii_lowercase())
                }
                _ => return Err(invalid()),
            });
        }
        Ok(Filter { clauses })
    }

    pub fn matches(&self, batch: &Batch) -> bool {
        self.clauses.iter().all(|c| match c {
            Clause::CreatedAt(cmp, t) => cmp.holds(batch.created_at, *t),
            Clause::Status(eq, name) => (batch.status.as_str() == name) == *eq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orderby_is_odata_on_created_at() {
        assert_eq!(parse_orderby("created_at asc"), Ok(Order::OldestFirst));
        assert_eq!(parse_orderby("CREATED_AT  DESC"), Ok(Order::NewestFirst));
        assert_eq!(parse_orderby("created_at"), Ok(Order::OldestFirst));
        for bad in ["", "id asc", "created_at up", "created_at asc, id"] {
            assert!(parse_orderby(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_specs_and_the_docs_filters_parse() {
        // examples/get_batches.json, and the how-to's generate_time_filter.
        let spec = Filter::parse(
            "created_at gt 1646120000 and created_at lt 1646130000 and status eq 'completed'",
        )
        .unwrap();
        assert_eq!(
            spec.clauses,
            vec![
                Clause::CreatedAt(Cmp::Gt, 1646120000),
                Clause::CreatedAt(Cmp::Lt, 1646130000),
                Clause::Status(true, "completed".into()),
            ]
        );
        let docs = Filter::parse("created_at gt 1728860560 and status eq 'Completed'").unwrap();
        assert_eq!(docs.clauses[1], Clause::Status(true, "completed".into()));
        assert_eq!(Filter::parse("").unwrap(), Filter::default());
        for bad in [
            "created_at gt",
            "created_at gt soon",
            "created_at after 5",
            "status gt 'completed'",
            "status eq completed",
            "id eq 'batch_1'",
            "created_at gt 5 or created_at lt 2",
            "created_at gt 5 and",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }
}
