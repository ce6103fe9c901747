//! Output convention of every dmalab command: a human table by default, JSON Lines (one object
//! per result row, nothing else on stdout) with `--json`.

use serde_json::{Map, Value};

/// Rows of one result, printed as a table or as JSON Lines.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<Map<String, Value>>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a row; `row` must serialize to a JSON object.
    pub fn push(&mut self, row: impl serde::Serialize) {
        match serde_json::to_value(row) {
            Ok(Value::Object(m)) => self.rows.push(m),
            other => panic!("report rows must be JSON objects, got {other:?}"),
        }
    }

    /// Prints the report: JSON Lines if `json`, else an aligned table.
    pub fn print(&self, json: bool) {
        print!("{}", if json { self.to_json_lines() } else { self.to_table() });
    }

    /// One JSON object per line.
    pub fn to_json_lines(&self) -> String {
        self.rows.iter().map(|r| format!("{}\n", Value::Object(r.clone()))).collect()
    }

    /// An aligned text table; columns are the union of row keys in first-seen order.
    pub fn to_table(&self) -> String {
        let mut cols: Vec<&str> = Vec::new();
        for r in &self.rows {
            for k in r.keys() {
                if !cols.contains(&k.as_str()) {
                    cols.push(k);
                }
            }
        }
        let cell = |r: &Map<String, Value>, c: &str| match r.get(c) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if n.is_f64() => format_float(f),
                _ => n.to_string(),
            },
            Some(v) => v.to_string(),
        };
        let cells: Vec<Vec<String>> =
            self.rows.iter().map(|r| cols.iter().map(|c| cell(r, c)).collect()).collect();
        let widths: Vec<usize> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| cells.iter().map(|r| r[i].len()).chain([c.len()]).max().unwrap_or(0))
            .collect();
        let line = |vals: Vec<&str>| {
            let mut s =
                vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect::<Vec<_>>().join("  ");
            s.truncate(s.trim_end().len());
            s + "\n"
        };
        let mut out = line(cols.clone());
        out += &line(
            widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().iter().map(String::as_str).collect(),
        );
        for r in &cells {
            out += &line(r.iter().map(String::as_str).collect());
        }
        out
    }
}

/// Three significant decimals for small values, fewer for large ones.
fn format_float(f: f64) -> String {
    if f.abs() >= 100.0 { format!("{f:.1}") } else { format!("{f:.3}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_lines_are_one_object_per_row_in_key_order() {
        let mut r = Report::new();
        r.push(json!({"b": 1, "a": "x"}));
        r.push(json!({"b": 2.5, "a": "y"}));
        assert_eq!(r.to_json_lines(), "{\"b\":1,\"a\":\"x\"}\n{\"b\":2.5,\"a\":\"y\"}\n");
    }

    #[test]
    fn table_aligns_columns_and_unions_keys() {
        let mut r = Report::new();
        r.push(json!({"name": "a", "n": 10}));
        r.push(json!({"name": "long", "extra": 1.0}));
        let t = r.to_table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "name  n   extra");
        assert_eq!(lines[2], "a     10");
        assert_eq!(lines[3], "long      1.000");
    }
}
