//! containerd's snapshot list filters (`ctr snapshots ls` and the garbage collector send them).

use super::{Result, SnapError};
use crate::store::{Kind, Snapshot};

/// A containerd filter: comma-separated `field==value`, `field!=value` or `field` terms
/// (fields: `name`, `parent`, `kind`, `labels.<key>` with optional quotes); several filters
/// are OR-ed.
pub(super) struct Filter(Vec<(String, Option<(bool, String)>)>);

impl Filter {
    pub(super) fn parse_all(filters: &[String]) -> Result<Vec<Filter>> {
        filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| Filter::parse(f))
            .collect()
    }

    fn parse(s: &str) -> Result<Filter> {
        let unq = |v: &str| v.trim().trim_matches('"').to_string();
        let mut terms = Vec::new();
        for t in s.split(',') {
            let (field, cond) = if let Some((f, v)) = t.split_once("!=") {
                (f, Some((false, unq(v))))
            } else if let Some((f, v)) = t.split_once("==") {
                (f, Some((true, unq(v))))
            } else if t.contains('~') {
                return Err(SnapError::InvalidArgument(format!(
                    "unsupported filter operator in {s:?}"
                )));
            } else {
                (t, None)
            };
            let field = field.trim();
            let field = match field.strip_prefix("labels.") {
                Some(l) => format!("labels.{}", l.trim_matches('"')),
                None => field.to_string(),
            };
            terms.push((field, cond));
        }
        Ok(Filter(terms))
    }

    pub(super) fn matches(&self, name: &str, s: &Snapshot) -> bool {
        self.0.iter().all(|(field, cond)| {
            let kind = match s.kind {
                Kind::View => "view",
                Kind::Active => "active",
                Kind::Committed => "committed",
            };
            let value: Option<&str> = match field.as_str() {
                "name" => Some(name),
                "parent" => Some(s.parent.as_deref().unwrap_or("")),
                "kind" => Some(kind),
                f => f
                    .strip_prefix("labels.")
                    .and_then(|l| s.labels.get(l))
                    .map(String::as_str),
            };
            match cond {
                None => value.is_some(),
                Some((true, v)) => value == Some(v.as_str()),
                Some((false, v)) => value != Some(v.as_str()),
            }
        })
    }
}
