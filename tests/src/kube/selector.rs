//! Label selectors (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`,
//! `!a`) and field selectors (`path=value`, `path!=value` on any dotted path,
//! such as `metadata.name` or `status.phase`), as list and watch take them.

use serde_json::Value;

/// A parsed `labelSelector`; empty selects everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelSelector(Vec<Requirement>);

#[derive(Clone, Debug)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `fieldSelector`; empty selects everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

// === impl LabelSelector ===

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(Requirement::parse(term)?);
        }
        Ok(Self(requirements))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

impl Requirement {
    fn parse(term: &str) -> Result<Self, String> {
        let bad = || format!("unable to parse requirement: {term:?}");
        if let Some(key) = term.strip_prefix('!') {
            return Ok(Self::NotExists(key.trim().to_owned()));
        }
        for (keyword, not) in [(" notin ", true), (" in ", false)] {
            if let Some((key, values)) = term.split_once(keyword) {
                let values = values
                    .trim()
                    .strip_prefix('(')
                    .and_then(|v| v.strip_suffix(')'))
                    .ok_or_else(bad)?;
                let values = values.split(',').map(|v| v.trim().to_owned()).collect();
                let key = key.trim().to_owned();
                return Ok(if not {
                    Self::NotIn(key, values)
                } else {
                    Self::In(key, values)
                });
            }
        }
        if let Some((key, value)) = term.split_once("!=") {
            return Ok(Self::NotEq(key.trim().to_owned(), value.trim().to_owned()));
        }
        if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            return Ok(Self::Eq(key.trim().to_owned(), value.trim().to_owned()));
        }
        if term.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(Self::Exists(term.to_owned()))
    }
}

// === impl FieldSelector ===

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!(
                    "invalid selector: {term:?}; must be path=value or path!=value"
                ));
            };
            terms.push((path.trim().to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let mut at = object;
            for part in path.split('.') {
                at = &at[part];
            }
            let text = match at {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (text == *value) == *equal
        })
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}
