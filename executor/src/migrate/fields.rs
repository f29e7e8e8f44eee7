//! Typed reads out of one table of the input `config.toml`, naming the key on error.
//! Every read removes the key, so what is left afterwards ([`Fields::rest`]) is exactly the
//! keys the conversion did not handle, to be reported rather than dropped.
//!
//! Error messages name the key and the expected type, never the value: a value may be a
//! token.

use super::error::Bad;

pub(super) struct Fields {
    table: toml::Table,
    /// Key path of the table in the input, e.g. `runners[0].machine`.
    path: String,
}

impl Fields {
    pub(super) fn new(table: toml::Table, path: impl Into<String>) -> Self {
        Self {
            table,
            path: path.into(),
        }
    }

    /// The input key path of `key` in this table.
    pub(super) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn take(&mut self, key: &str) -> Option<toml::Value> {
        self.table.remove(key)
    }

    fn bad(&self, key: &str, expected: &str, found: &toml::Value) -> Bad {
        Bad::new(
            self.key(key),
            format!("expected {expected}, found {}", found.type_str()),
        )
    }

    pub(super) fn string(&mut self, key: &str) -> Result<Option<String>, Bad> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, "a string", &v)),
        }
    }

    pub(super) fn int(&mut self, key: &str) -> Result<Option<i64>, Bad> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::Integer(i)) => Ok(Some(i)),
            Some(v) => Err(self.bad(key, "an integer", &v)),
        }
    }

    /// A count: an integer from 0 to `u32::MAX`.
    pub(super) fn count(&mut self, key: &str) -> Result<Option<u32>, Bad> {
        match self.int(key)? {
            None => Ok(None),
            Some(i) => u32::try_from(i)
                .map(Some)
                .map_err(|_| Bad::new(self.key(key), format!("{i} must be 0 or more"))),
        }
    }

    /// A number, written as a float or an integer.
    pub(super) fn float(&mut self, key: &str) -> Result<Option<f64>, Bad> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::Float(f)) => Ok(Some(f)),
            Some(toml::Value::Integer(i)) => Ok(Some(i as f64)),
            Some(v) => Err(self.bad(key, "a number", &v)),
        }
    }

    pub(super) fn bool(&mut self, key: &str) -> Result<Option<bool>, Bad> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(b)),
            Some(v) => Err(self.bad(key, "true or false", &v)),
        }
    }

    /// An array of strings; with `single`, one string is read as a one-element list (as
    /// gitlab-runner reads `pull_policy`).
    pub(super) fn strings(&mut self, key: &str, single: bool) -> Result<Option<Vec<String>>, Bad> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) if single => Ok(Some(vec![s])),
            Some(toml::Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::String(s) => Ok(s),
                    other => Err(Bad::new(
                        format!("{}[{i}]", self.key(key)),
                        format!("expected a string, found {}", other.type_str()),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.bad(key, "an array of strings", &v)),
        }
    }

    pub(super) fn table(&mut self, key: &str) -> Result<Option<toml::Table>, Bad> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(v) => Err(self.bad(key, "a table", &v)),
        }
    }

    /// `[[key]]`: an array of tables.
    pub(super) fn tables(&mut self, key: &str) -> Result<Vec<toml::Table>, Bad> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::Table(t) => Ok(t),
                    other => Err(Bad::new(
                        format!("{}[{i}]", self.key(key)),
                        format!("expected a table, found {}", other.type_str()),
                    )),
                })
                .collect(),
            Some(v) => Err(self.bad(key, "an array of tables", &v)),
        }
    }

    /// The keys no read took, in input order.
    pub(super) fn rest(self) -> toml::Table {
        self.table
    }
}

/// True for a value that only restates a default: `""`, `0`, `false`, `[]`, `[""]`, `{}`.
pub(super) fn is_empty_value(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => s.is_empty(),
        toml::Value::Integer(i) => *i == 0,
        toml::Value::Float(f) => *f == 0.0,
        toml::Value::Boolean(b) => !b,
        toml::Value::Array(a) => a.iter().all(is_empty_value),
        toml::Value::Table(t) => t.is_empty(),
        toml::Value::Datetime(_) => false,
    }
}

/// A short rendering of a value for the report (strings unquoted, tables elided).
pub(super) fn brief(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Table(_) => "{...}".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Fields {
        Fields::new(toml::from_str(text).unwrap(), "runners[0].machine")
    }

    #[test]
    fn wrong_types_name_the_key_and_not_the_value() {
        let mut f = fields("IdleCount = \"five\"\nMachineOptions = [\"a\", 3]\n");
        let e = f.count("IdleCount").unwrap_err();
        assert_eq!(e.key, "runners[0].machine.IdleCount");
        assert_eq!(e.message, "expected an integer, found string");
        let e = f.strings("MachineOptions", false).unwrap_err();
        assert_eq!(e.key, "runners[0].machine.MachineOptions[1]");
        let mut f = fields("IdleCount = -1\n");
        assert!(f
            .count("IdleCount")
            .unwrap_err()
            .message
            .contains("0 or more"));
    }

    #[test]
    fn reads_remove_keys_and_the_rest_keeps_input_order() {
        let mut f = fields("b = 1\nIdleTime = 600\na = 2\n");
        assert_eq!(f.count("IdleTime").unwrap(), Some(600));
        let rest: Vec<String> = f.rest().keys().cloned().collect();
        assert_eq!(rest, ["b", "a"]);
    }

    #[test]
    fn empty_values_are_defaults() {
        for v in ["\"\"", "0", "false", "[]", "[\"\"]", "{}"] {
            let t: toml::Table = toml::from_str(&format!("k = {v}")).unwrap();
            assert!(is_empty_value(&t["k"]), "{v}");
        }
        let t: toml::Table = toml::from_str("k = [\"x\"]").unwrap();
        assert!(!is_empty_value(&t["k"]));
    }
}
